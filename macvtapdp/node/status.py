"""``macvtapdp status``: one line per program, and an exit code probes can use.

Everything comes from the run directory: supervisord's control socket (the
processes), each resource's state file (its socket, registration, lower link
and devices) and a probe of that socket, ``GetDevicePluginOptions``: a unary
call, which needs a free worker as the kubelet's Allocate does but holds no
ListAndWatch stream slot. A resource whose lower link is missing still serves
(all devices Unhealthy): that is reported, and it counts as serving. Any
program that is not RUNNING (a resource, the reconciler, the watchdog, the
metrics endpoint) makes the exit code 3.

This runs on every probe, so it is cheap (bench/probes.py): ``main`` answers the
probes' command lines without typer (``macvtapdp.__main__`` calls it first),
supervisord is asked with ``control``'s standard-library XML-RPC, and sockets
with ``grpcping``'s hand-made call instead of grpc. ``--alive`` (the liveness
question: does supervisord answer?) is one XML-RPC call and nothing more.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from macvtapdp import rundir
from macvtapdp.errors import Unreachable
from macvtapdp.node.names import resource_of
from macvtapdp.rundir import Layout

PROBE_TIMEOUT = 2.0
ALIVE_FLAG = "--alive"
EXIT_OK = 0
EXIT_DOWN = 3  # as supervisorctl status: something is not running
EXIT_UNREACHABLE = 4  # as supervisorctl status: supervisord does not answer


class Row:
    """What ``status`` knows about one supervised program."""

    def __init__(
        self,
        program: str,
        resource: str | None,
        process: str,
        pid: int,
        uptime: float,
        *,
        kubelet: str = "-",
        link: str = "-",
        sweep: str = "-",
        serving: bool = False,
        healthy: int = 0,
        total: int = 0,
    ) -> None:
        self.program, self.resource, self.process = program, resource, process
        self.pid, self.uptime = pid, uptime
        self.kubelet, self.link, self.sweep = kubelet, link, sweep
        self.serving, self.healthy, self.total = serving, healthy, total

    @property
    def ok(self) -> bool:
        return self.process == "RUNNING" and (self.resource is None or self.serving)


def probe(socket_path: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a device plugin answers GetDevicePluginOptions on ``socket_path``."""
    from macvtapdp.node import grpcping

    return grpcping.answers(socket_path, timeout)


def row(info: dict[str, Any], layout: Layout) -> Row:
    """Status of one program from its ``getProcessInfo`` dict."""
    from macvtapdp import statefile

    program = str(info["name"])
    resource = resource_of(program)
    running = info["statename"] == "RUNNING"
    pid = int(info["pid"])
    uptime = float(info["now"] - info["start"]) if running else 0.0
    if resource is None:
        return Row(program, None, str(info["statename"]), pid, uptime)
    reported = statefile.read(layout.state_file(resource)) if running else {}
    if reported.get("pid") != pid:
        reported = {}  # left by an earlier process
    socket = reported.get("socket")
    serving = isinstance(socket, str) and os.path.exists(socket) and probe(socket)
    total = reported.get("capacity")
    total = total if isinstance(total, int) else 0
    return Row(
        program,
        resource,
        str(info["statename"]),
        pid,
        uptime,
        kubelet=str(reported.get("kubelet", "-")),
        link=str(reported.get("link", "-")),
        sweep=str(reported.get("sweep", "-")),
        serving=serving,
        healthy=total if serving and reported.get("healthy") is True else 0,
        total=total,
    )


def rows(infos: Sequence[dict[str, Any]], layout: Layout) -> list[Row]:
    """Every program's row, probing the resources' sockets in parallel (probe timeouts
    must not add up past the probe's own timeout)."""
    import threading

    found: list[Row | None] = [None] * len(infos)

    def one(i: int) -> None:
        found[i] = row(infos[i], layout)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(infos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in found if r is not None]


def _uptime(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def table(rows: Sequence[Row]) -> str:
    """A fixed-width table: resources first, then the helper programs."""
    head = (
        "RESOURCE", "PROCESS", "PID", "UPTIME", "SERVING", "DEVICES", "KUBELET", "SWEEP",
        "LOWER LINK",
    )  # fmt: skip
    lines: list[tuple[str, ...]] = [head]
    for r in sorted(rows, key=lambda r: (r.resource is None, r.program)):
        devices = f"{r.healthy}/{r.total} healthy" if r.serving else "-"
        serving = "-" if r.resource is None else ("yes" if r.serving else "no")
        lines.append(
            (
                r.resource or f"({r.program})",
                r.process,
                str(r.pid or "-"),
                _uptime(r.uptime),
                serving,
                devices,
                r.kubelet,
                r.sweep,
                r.link,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True))
        + "  "
        + line[-1]
        for line in lines
    )


def report(run_dir: str, alive: bool) -> int:
    """Print the status of the instance using ``run_dir``; the exit code."""
    from macvtapdp.node.control import Supervisor

    layout = Layout(run_dir)
    try:
        with Supervisor(layout.server_url) as supervisor:
            infos = supervisor.processes()
    except Unreachable as err:
        print(f"macvtapdp: error: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if alive:
        print(f"supervisord answers: {len(infos)} programs")
        return EXIT_OK
    found = rows(infos, layout)
    print(table(found))
    return EXIT_OK if all(r.ok for r in found) else EXIT_DOWN


def main(argv: Sequence[str]) -> int | None:
    """``status [--alive] [--run-dir DIR]`` without typer; None for any other arguments
    (help, mistakes), which the typer CLI then handles, with the same meaning."""
    alive = False
    run_dir = os.environ.get(rundir.RUN_DIR_VAR) or rundir.DEFAULT_RUN_DIR
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == ALIVE_FLAG:
            alive = True
        elif arg == rundir.RUN_DIR_FLAG and args and not args[0].startswith("-"):
            run_dir = args.pop(0)
        elif arg.startswith(rundir.RUN_DIR_FLAG + "=") and len(arg) > len(rundir.RUN_DIR_FLAG) + 1:
            run_dir = arg.split("=", 1)[1]
        else:
            return None
    return report(run_dir, alive)
