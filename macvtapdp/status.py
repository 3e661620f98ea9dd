"""``macvtapdp status``: one line per resource, and an exit code probes can use.

For each resource: its process state (from supervisord), whether it is
registered with the kubelet (from its state file), whether its socket serves,
and its healthy/total device count, asked over the socket with ListAndWatch
exactly as the kubelet asks. A resource whose lower link is missing still
serves (all devices Unhealthy): that is reported, and it counts as serving.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from macvtapdp import naming, state
from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from macvtapdp.supervisord import Layout, resource_of

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
    serving: bool = False
    healthy: int = 0
    total: int = 0

    @property
    def ok(self) -> bool:
        return self.process == "RUNNING" and (self.resource is None or self.serving)


def probe(socket_path: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, int] | None:
    """(healthy, total) from the first ListAndWatch answer, or None if nothing serves."""
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=timeout)
            stream = stub.ListAndWatch(api_pb2.Empty(), timeout=timeout)
            try:
                first = next(stream)
            finally:
                stream.cancel()
    except (grpc.RpcError, StopIteration):
        return None
    healthy = sum(1 for d in first.devices if d.health == "Healthy")
    return healthy, len(first.devices)


def current_socket(name: str, plugin_dir: str, endpoint: str | None) -> str | None:
    """The socket resource ``name`` serves on now: its reported one, else any of its own."""
    if endpoint and os.path.exists(os.path.join(plugin_dir, endpoint)):
        return os.path.join(plugin_dir, endpoint)
    try:
        found = [e for e in os.scandir(plugin_dir) if naming.is_own_socket(name, e.name)]
    except FileNotFoundError:
        return None
    newest = max(found, key=lambda e: e.stat().st_mtime, default=None)
    return newest.path if newest else None


def row(info: dict[str, Any], layout: Layout, plugin_dir: str) -> Row:
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
    reported = state.read(layout.state_file(resource)) if running else {}
    if reported.get("pid") != base.pid:
        reported = {}  # left by an earlier process
    socket = current_socket(resource, plugin_dir, reported.get("endpoint"))
    counts = probe(socket) if socket and running else None
    return Row(
        **{
            **base.__dict__,
            "kubelet": str(reported.get("kubelet", "-")),
            "link": str(reported.get("link", "-")),
            "serving": counts is not None,
            "healthy": counts[0] if counts else 0,
            "total": counts[1] if counts else 0,
        }
    )


def rows(infos: Sequence[dict[str, Any]], layout: Layout, plugin_dir: str) -> list[Row]:
    """Every program's row, probing the resources' sockets in parallel (probe timeouts
    must not add up past the probe's own timeout)."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(infos)))) as pool:
        return list(pool.map(lambda info: row(info, layout, plugin_dir), infos))


def _uptime(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def table(rows: Sequence[Row]) -> str:
    """A fixed-width table: resources first, then the helper programs."""
    head = ("RESOURCE", "PROCESS", "PID", "UPTIME", "SERVING", "DEVICES", "KUBELET", "LOWER LINK")
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
