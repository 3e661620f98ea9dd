"""The committed constraints.txt: write it from pyproject.toml's pins, or check it.

    python3 .ci/constraints.py lock    # after changing the dependencies in pyproject.toml
    python3 .ci/constraints.py check   # CI: a fresh venv would install from it, all pinned

The image installs exactly these versions (``pip install -c constraints.txt .``), so a
build never picks up a new release by itself (typer 0.29 changed help rendering and
pulled in pydantic that way); CI tests against the same versions. ``check`` asks pip
for a dry run in a fresh venv with the constraints and fails if the resolution is
refused or installs anything the file does not pin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "constraints.txt"
# The build backend: pyproject.toml's [build-system] asks for setuptools>=69, and the
# Containerfile sets PIP_CONSTRAINT so that pip's isolated build environment uses this.
BUILD = ["setuptools"]
HEADER = """\
# Every runtime dependency of macvtapdp at the version the image installs and CI tests.
# Written by `python3 .ci/constraints.py lock` from pyproject.toml's ranges; checked by
# `.ci/constraints.py check` (run by .ci/run). Do not edit by hand.
"""


def fresh_venv(where: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", where], check=True)
    return Path(where) / "bin" / "pip"


def normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in FILE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"constraints.txt: {line!r} is not name==version")
            found[normal(name)] = version
    return found


def lock() -> int:
    with tempfile.TemporaryDirectory() as where:
        pip = fresh_venv(where)
        subprocess.run([pip, "install", "--quiet", str(ROOT)], check=True)
        frozen = subprocess.run(
            [pip, "freeze", "--exclude", "macvtapdp"], check=True, capture_output=True, text=True
        ).stdout
        lines = frozen.splitlines() + [f"{n}=={v}" for n, v in resolve(pip, build_requires())]
    FILE.write_text(HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n", encoding="utf-8")
    print(f"wrote {FILE} ({len(lines)} packages)")
    return 0


def build_requires() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        required: list[str] = tomllib.load(fh)["build-system"]["requires"]
    return required


def resolve(pip: Path, requirements: list[str]) -> list[tuple[str, str]]:
    """What pip would install for ``requirements`` now: (name, version)."""
    done = subprocess.run(
        [pip, "install", "--dry-run", "--quiet", "--ignore-installed", "--report", "-",
         *requirements],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [
        (i["metadata"]["name"], i["metadata"]["version"])
        for i in json.loads(done.stdout)["install"]
    ]


def check() -> int:
    pinned = pins()
    missing_build = [b for b in BUILD if b not in pinned]
    if missing_build:
        print(f"constraints.txt: no pin for the build backend {missing_build}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as where:
        pip = fresh_venv(where)
        done = subprocess.run(
            [pip, "install", "--dry-run", "--quiet", "--report", "-", "-c", str(FILE), str(ROOT)],
            capture_output=True, text=True, env={"PIP_CONSTRAINT": str(FILE), **_env()},
        )  # fmt: skip
    if done.returncode != 0:
        print(f"constraints.txt does not install:\n{done.stderr}", file=sys.stderr)
        return 1
    report = json.loads(done.stdout)
    chosen = {normal(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    chosen.pop("macvtapdp", None)
    unpinned = sorted(set(chosen) - set(pinned))
    unused = sorted(set(pinned) - set(chosen) - set(BUILD))
    if unpinned or unused:
        print(
            f"constraints.txt is stale (not pinned: {unpinned}; not needed: {unused}): "
            "run python3 .ci/constraints.py lock",
            file=sys.stderr,
        )
        return 1
    print(f"constraints.txt: {len(chosen)} dependencies install, every one pinned")
    return 0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}


if __name__ == "__main__":
    commands = {"lock": lock, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: {sys.argv[0]} lock|check")
    sys.exit(commands[sys.argv[1]]())
