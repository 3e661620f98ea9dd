"""``macvtapdp status``: one line per program, and an exit code probes can use.

Everything comes from the run directory: supervisord's control socket (the
processes), each resource's state file (its socket, registration, lower link
and devices) and a probe of that socket. The probe is ``GetDevicePluginOptions``,
a unary call: it needs a free worker, as the kubelet's Allocate does, but holds
no ListAndWatch stream slot. A resource whose lower link is missing still serves
(all devices Unhealthy): that is reported, and it counts as serving. Any
program that is not RUNNING (a resource, the reconciler, the watchdog, the
metrics endpoint) makes the exit code 3.

grpc is imported only when a socket is probed: ``--alive`` (the liveness
question: does supervisord answer?) costs an interpreter, typer and one XML-RPC
call, nothing more. The DaemonSet's probes are HTTP GETs of the metrics
endpoint's ``/healthz`` and ``/readyz``, which answer from this same module in
a process that is already running (the README has what each way costs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from macvtapdp import statefile
from macvtapdp.errors import Unreachable
from macvtapdp.node.names import resource_of
from macvtapdp.rundir import Layout

PROBE_TIMEOUT = 2.0
EXIT_OK = 0
EXIT_DOWN = 3  # as supervisorctl status: something is not running
EXIT_UNREACHABLE = 4  # as supervisorctl status: supervisord does not answer


@dataclass(frozen=True)
class Row:
    """What ``status`` knows about one supervised program."""

    program: str
    resource: str | None
    process: str
    pid: int
    uptime: float
    kubelet: str = "-"
    link: str = "-"
    sweep: str = "-"
    serving: bool = False
    healthy: int = 0
    total: int = 0

    @property
    def ok(self) -> bool:
        return self.process == "RUNNING" and (self.resource is None or self.serving)


def probe(socket_path: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a device plugin answers GetDevicePluginOptions on ``socket_path``."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no INFO lines of gRPC's C core
    import grpc

    from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=timeout)
    except grpc.RpcError:
        return False
    return True


def row(info: dict[str, Any], layout: Layout) -> Row:
    """Status of one program from its ``getProcessInfo`` dict."""
    program = str(info["name"])
    resource = resource_of(program)
    running = info["statename"] == "RUNNING"
    base = Row(
        program=program,
        resource=resource,
        process=str(info["statename"]),
        pid=int(info["pid"]),
        uptime=float(info["now"] - info["start"]) if running else 0.0,
    )
    if resource is None:
        return base
    reported = statefile.read(layout.state_file(resource)) if running else {}
    if reported.get("pid") != base.pid:
        reported = {}  # left by an earlier process
    socket = reported.get("socket")
    serving = isinstance(socket, str) and os.path.exists(socket) and probe(socket)
    total = reported.get("capacity")
    total = total if isinstance(total, int) else 0
    return replace(
        base,
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
    if not any(resource_of(str(i["name"])) for i in infos):
        return [row(info, layout) for info in infos]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(infos)))) as pool:
        return list(pool.map(lambda info: row(info, layout), infos))


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
    """Print the status of the node at ``run_dir`` (or only whether supervisord answers);
    the exit code, as supervisorctl's: 0 all serving, 3 something is not, 4 no answer."""
    import sys

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
