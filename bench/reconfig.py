"""How long a change of the configuration file takes to be applied.

The real ``macvtapdp run --config-file`` (12 resources on veth lower links, the
kubelet stand-in; ``bench.rig``) follows a file changed three ways:

- ``swap``: as the kubelet updates a ConfigMap volume (a new ``..<stamp>``
  directory, a ``..data_tmp`` symlink renamed over ``..data``, the old
  directory removed; the file is ``DP_MACVTAP_CONF -> ..data/DP_MACVTAP_CONF``);
- ``rename``: a new file renamed over a plain file;
- ``edit``: a plain file truncated and written in place;

for 1 and for 10 changed resources (their capacity alternates between 2 and 3,
so each is restarted), plus one mixed change (one added, one removed, one
restarted). Two resources never change and must keep their process and
registration. Figures, from just before the file operation:

- **applied**: the reconciler's last log line of the pass (every program
  stopped, removed or added with its new settings in supervisord);
- **registered**: every changed resource registered again with its new
  devices Healthy, and every removed one gone: bounded by the interpreter
  start of each new process (~0.3 s CPU each, on 2 cores).

Target (DESIGN.md): applied <= 1 s, whatever the number of changed resources.

    .venv/bin/python -m bench.reconfig [--rounds 5]  # in the checkout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.rig import BenchError, Rig, median
from harness.kubelet import ResourceState
from harness.processes import all_healthy

RESOURCES = 12
STEADY = 2  # lk10 and lk11 never change
TARGET_MS = 1000.0


class ConfigFile:
    """The file the node follows, changed as ``how`` says."""

    def __init__(self, directory: Path, how: str) -> None:
        self.dir, self.how, self.stamp = directory, how, 0
        self.path = directory / "DP_MACVTAP_CONF"

    def write(self, text: str) -> None:
        if self.how == "swap":
            self.stamp += 1
            new = self.dir / f"..{self.stamp}"
            new.mkdir()
            (new / "DP_MACVTAP_CONF").write_text(text)
            tmp = self.dir / "..data_tmp"
            tmp.symlink_to(new.name)
            old = os.readlink(self.dir / "..data") if (self.dir / "..data").is_symlink() else None
            os.rename(tmp, self.dir / "..data")
            if not self.path.is_symlink():
                self.path.symlink_to("..data/DP_MACVTAP_CONF")
            if old:
                for f in (self.dir / old).iterdir():
                    f.unlink()
                (self.dir / old).rmdir()
        elif self.how == "rename":
            tmp = self.dir / ".conf.tmp"
            tmp.write_text(text)
            os.rename(tmp, self.path)
        else:
            with open(self.path, "w", encoding="utf-8") as fh:  # truncate, then write
                fh.write(text)


def conf(names: Sequence[str], capacity: dict[str, int]) -> str:
    return json.dumps([{"name": n, "master": n, "capacity": capacity[n]} for n in names])


def trial(
    rig: Rig,
    file: ConfigFile,
    before: list[str],
    after: list[str],
    capacity: dict[str, int],
    changed: list[str],
) -> tuple[float, float]:
    """Change the file from ``before`` to ``after``; (applied, registered) in ms."""
    steady = [n for n in before if n in after and n not in changed]
    counts = rig.register_counts() | {n: 0 for n in after if n not in before}
    pids = {n: rig.program_pids().get(f"resource-{n}") for n in steady}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    mark = len(rig.log_lines())
    started = time.monotonic()
    file.write(conf(after, capacity))
    lines = [rf"\[reconcile\] restarted resource {re.escape(n)}\b" for n in changed]
    lines += [rf"\[reconcile\] added resource {re.escape(n)}\b" for n in added]
    lines += [rf"\[reconcile\] removed resource {re.escape(n)}\b" for n in removed]
    for pattern in lines:
        rig.wait_log(pattern, mark)
    applied = max(t for p in lines if (t := rig.log_time(p, mark)) is not None)
    for name in [*changed, *added]:
        rig.wait(name, new_devices(capacity[name], counts.get(name, 0)), "applied", 15)
    for name in removed:
        rig.wait(name, lambda s: not s.connected, "removed", 15)
    registered = max(
        [healthy_at(rig, n, started, capacity[n]) for n in [*changed, *added]]
        + [_stopped_at(rig, n) for n in removed]
    )
    for name in steady:  # untouched: same process, no new registration
        if rig.program_pids().get(f"resource-{name}") != pids[name]:
            raise BenchError(f"{name} was restarted, though it did not change")
        if rig.register_counts()[name] != counts[name]:
            raise BenchError(f"{name} registered again, though it did not change")
    return (applied - started) * 1000, (registered - started) * 1000


def new_devices(capacity: int, registered: int) -> Callable[[ResourceState], bool]:
    """Registered again since ``registered``, with ``capacity`` devices, all Healthy."""
    healthy = all_healthy(capacity, registered)
    return lambda s: healthy(s) and s.capacity == capacity


def healthy_at(rig: Rig, name: str, since: float, capacity: int) -> float:
    """When the stand-in first got ``capacity`` devices, all Healthy, after ``since``."""
    for at, devices in rig.kubelet.history(rig.resource(name)):
        if at >= since and len(devices) == capacity and set(devices.values()) == {"Healthy"}:
            return float(at)
    raise BenchError(f"{name}: no snapshot of {capacity} Healthy devices")


def _stopped_at(rig: Rig, name: str) -> float:
    stopped = rig.kubelet.state(rig.resource(name)).stopped_at
    if stopped is None:
        raise BenchError(f"{name}: no disconnect recorded")
    return stopped


def scenario(rig: Rig, file: ConfigFile, kind: str, rounds: int) -> list[tuple[float, float]]:
    """``rounds`` changes of one kind: "1" or "10" restarted, or "mixed" (lk9 removed or
    added back in turn, lk0 restarted)."""
    everyone = rig.names
    capacity = dict.fromkeys(everyone, 2)
    present = list(everyone)
    samples = []
    for _ in range(rounds):
        before = present
        if kind == "mixed":
            changed = ["lk0"]
            present = [n for n in everyone if n != "lk9"] if "lk9" in before else list(everyone)
        else:
            changed = everyone[: int(kind)]
        for n in changed:
            capacity[n] = 5 - capacity[n]  # 2 <-> 3
        samples.append(trial(rig, file, before, present, capacity, changed))
        time.sleep(0.3)  # let the new processes settle before the next change
    if present != everyone:  # leave every resource there for the next kind
        trial(rig, file, present, list(everyone), capacity, [])
    file.write(conf(everyone, dict.fromkeys(everyone, 2)))
    rig.wait_all(all_healthy(2), "back to the start", 30.0)
    time.sleep(0.5)
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5, help="changes per case, default 5")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("reconfig: run as root (network namespaces, supervisord)", file=sys.stderr)
        return 2
    results: dict[str, list[tuple[float, float]]] = {}
    for how in ("swap", "rename", "edit"):
        try:
            with (
                tempfile.TemporaryDirectory(prefix=f"mdp-{how}-") as where,
                Rig(RESOURCES, 2) as rig,
                rig.log_on_failure(),
            ):
                file = ConfigFile(Path(where), how)
                file.write(conf(rig.names, dict.fromkeys(rig.names, 2)))
                rig.node.env = {}
                rig.kubelet.start()
                rig.node.start(f"--config-file={file.path}")
                rig.wait_all(all_healthy(2), "registered and Healthy", 60.0)
                time.sleep(1.0)
                for kind in ("1", "10", "mixed"):
                    results[f"{how} {kind}"] = scenario(rig, file, kind, args.rounds)
                    say(f"{how} {kind}: {results[f'{how} {kind}']}")
        except BenchError as err:
            print(f"reconfig: failed: {err}", file=sys.stderr)
            return 1
    print(render(results))
    return 0


def say(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def render(results: dict[str, list[tuple[float, float]]]) -> str:
    head = "change (file, resources)   | applied ms p50 / max | <= 1000? | registered ms p50 / max"
    rows = [head, "-" * len(head)]
    what = {"1": "1 restarted", "10": "10 restarted", "mixed": "+1 -1 ~1"}
    for key, samples in results.items():
        applied = [a for a, _ in samples]
        registered = [r for _, r in samples]
        ok = "yes" if max(applied) <= TARGET_MS else "NO"
        how, kind = key.split()
        rows.append(
            f"{how + ', ' + what[kind]:<26} | {median(applied):7.0f} / {max(applied):7.0f}    | "
            f"{ok:<8} | "
            f"{median(registered):7.0f} / {max(registered):7.0f}"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
