"""``macvtapdp run``: validate, render supervisord's config, exec supervisord.

After the exec supervisord is the container's PID 1: it gets the pod's SIGTERM
and stops every resource. Nothing half-made on bad configuration: every
problem is reported and nothing is written or started.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import NoReturn

from macvtapdp import config
from macvtapdp.supervisord import Layout, render


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def supervisord_argv() -> list[str]:
    """supervisord from this installation (beside our interpreter), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "supervisord")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("supervisord")
    return [found] if found else [sys.executable, "-m", "supervisor.supervisord"]


def launch(plugin_dir: str, config_file: str | None, run_dir: str) -> NoReturn:
    """Validate and render (raising ConfigError/RenderError), then become supervisord."""
    layout = Layout(run_dir)
    conf = config.load(file=config_file)
    text = render(conf, plugin_dir=plugin_dir, layout=layout)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    write_atomically(layout.conf, text)
    names = ", ".join(r.name for r in conf.resources) or "(none)"
    print(
        f"macvtapdp: {len(conf.resources)} resources from {conf.source}: {names}; "
        f"starting supervisord with {layout.conf}",
        file=sys.stderr,
        flush=True,
    )
    # children inherit these: serve writes its state file, status finds it
    os.environ["MACVTAPDP_RUN_DIR"] = run_dir
    os.environ["MACVTAPDP_PLUGIN_DIR"] = plugin_dir
    argv = supervisord_argv()
    os.execv(argv[0], [*argv, "--nodaemon", "--configuration", layout.conf])
