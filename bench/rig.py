"""The benchmark's test bed: a netns, one veth lower link per resource, the kubelet
stand-in and the real ``macvtapdp run`` under supervisord (``harness.processes.Node``).

Every time here is ``time.monotonic()`` of this process: the stand-in stamps its
ListAndWatch snapshots with it, ``LinkEvents`` stamps the kernel's link events with
it, and log lines of supervisord and serve (wall clock, ms) are converted to it.
Everything the rig makes is undone by ``close()``, also when setting up fails half-way.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from harness.kubelet import FakeKubelet, ResourceState
from harness.netns import NetNS
from harness.processes import (
    METRICS_ADDRESS,
    RESOURCE_DOMAIN,
    Node,
    all_healthy,
    resource,
    rmtree,
    until,
)
from macvtapdp.errors import EventsLost
from macvtapdp.linux.link import Link
from macvtapdp.linux.linkevents import LinkEvents
from macvtapdp.linux.netlink import Netlink

START_TIMEOUT = 30.0  # a cold start of 10 resources on 2 busy cores stays well below
STEP_TIMEOUT = 10.0
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

Predicate = Callable[[ResourceState], bool]


class BenchError(Exception):
    """Something the benchmark waits for did not happen: the figure cannot be measured."""


def median(samples: Iterable[float]) -> float:
    return percentile(samples, 50)


def percentile(samples: Iterable[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN without samples."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class ProcMem:
    """One process's memory from ``/proc/<pid>/smaps_rollup``, in MiB."""

    name: str
    pid: int
    rss: float
    pss: float
    uss: float  # Private_Clean + Private_Dirty: what killing the process would free


def proc_memory(name: str, pid: int) -> ProcMem | None:
    """``pid``'s memory, or None if it is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[key] = int(parts[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    mib = 1024.0
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return ProcMem(name, pid, fields["Rss"] / mib, fields["Pss"] / mib, uss / mib)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class StampedLinkEvents:
    """Link events of a netns as the plugin's own ``LinkEvents`` delivers them, stamped.

    A thread blocks in select() on the queue, so the stamp is the kernel's
    delivery, pyroute2's parsing and one wake-up: the path the plugin's own
    watcher takes.
    """

    def __init__(self, ns: NetNS) -> None:
        with ns.entered():  # the socket belongs to the netns it is made in
            self._monitor = LinkEvents()
        self._stop_r, self._stop_w = os.pipe()
        self._cond = threading.Condition()
        self._events: list[tuple[float, str, Link]] = []
        self.lost = 0  # times the kernel dropped events (ENOBUFS)
        self._thread = threading.Thread(target=self._run, name="bench-link-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self._monitor.fileno()
        while True:
            ready = select.select([fd, self._stop_r], [], [])[0]
            now = time.monotonic()
            if self._stop_r in ready:
                return
            try:
                events = self._monitor.read()
            except EventsLost:
                self.lost += 1
                continue
            with self._cond:
                self._events.extend((now, kind, link) for kind, link in events)
                self._cond.notify_all()

    def first(
        self, since: float, match: Callable[[str, Link], bool], timeout: float = STEP_TIMEOUT
    ) -> float:
        """When the first event at or after ``since`` that ``match``es was read."""
        found: list[float] = []

        def look() -> bool:
            found[:] = [t for t, kind, link in self._events if t >= since and match(kind, link)][:1]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(look, timeout):
                raise BenchError(f"no matching link event within {timeout:g} s")
        return found[0]

    def close(self) -> None:
        os.write(self._stop_w, b"\0")
        self._thread.join(5.0)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._monitor.close()


def is_link(name: str, kind: str, healthy: bool | None = None) -> Callable[[str, Link], bool]:
    """Matches events of ``kind`` for link ``name``; with ``healthy``, only in that state."""

    def match(event_kind: str, link: Link) -> bool:
        if event_kind != kind or link.name != name:
            return False
        return healthy is None or (link.admin_up and link.oper_ok) == healthy

    return match


class Rig:
    """``resources`` resources named ``lk<i>``, each on its own veth lower link ``lk<i>``."""

    def __init__(self, resources: int, capacity: int, metrics: bool = False) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self.names = [f"lk{i}" for i in range(resources)]
        # log lines carry wall-clock times; this turns them into monotonic ones
        self.clock_offset = time.time() - time.monotonic()
        self._stack = contextlib.ExitStack()
        try:
            self.ns = NetNS()
            self._stack.callback(self.ns.close)
            self._stack.callback(self._delete_lower_links)
            for name in self.names:
                self.ns.veth(name)
            conf = [{"name": n, "master": n, "capacity": capacity} for n in self.names]
            self.node = Node(self.ns, {"DP_MACVTAP_CONF": json.dumps(conf)})
            self._stack.callback(rmtree, self.node.run_dir)
            self._stack.callback(rmtree, self.node.plugin_dir)
            self.kubelet: FakeKubelet = self.node.kubelet
            self._stack.callback(self.kubelet.stop)
            self._stack.callback(self._kill_everything_in_netns)
            self._stack.callback(self._stop_node)
            with self.ns.entered():
                self.rtnl = Netlink()
            self._stack.callback(self.rtnl.close)
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    # -- names and waiting ------------------------------------------------------------------

    resource = staticmethod(resource)

    def wait(self, name: str, predicate: Predicate, what: str, timeout: float) -> None:
        if not self.kubelet.wait_for(self.resource(name), predicate, timeout):
            state = self.kubelet.state(self.resource(name))
            now = time.monotonic()
            tries = [
                f"{now - r.time:.1f} s ago: {r.error or 'accepted'}"
                for r in self.kubelet.registrations
                if r.resource_name == self.resource(name)
            ][-3:]
            raise BenchError(
                f"{name}: not {what} within {timeout:g} s (registered={state.registered} "
                f"connected={state.connected} register_count={state.register_count} "
                f"healthy={state.allocatable}/{state.capacity}; last Register calls: {tries})"
            )

    def wait_all(self, predicate: Predicate, what: str, timeout: float = STEP_TIMEOUT) -> None:
        for name in self.names:
            self.wait(name, predicate, what, timeout)

    def register_counts(self) -> dict[str, int]:
        return {n: self.kubelet.state(self.resource(n)).register_count for n in self.names}

    def wait_all_healthy_again(self, before: dict[str, int], timeout: float = STEP_TIMEOUT) -> None:
        """Every resource registered again since ``before`` and all Healthy."""
        for name in self.names:
            self.wait(name, all_healthy(self.capacity, before[name]), "Healthy again", timeout)

    def first_snapshot(self, name: str, since: float, healthy: bool) -> float:
        """When the stand-in first received, at or after ``since``, all devices in ``healthy``."""
        want = "Healthy" if healthy else "Unhealthy"
        for at, devices in self.kubelet.history(self.resource(name)):
            if at < since or len(devices) != self.capacity:
                continue
            if all(health == want for health in devices.values()):
                return at
        raise BenchError(f"{name}: no snapshot with all devices {want} since {since:.3f}")

    def all_healthy_at(self, since: float) -> float:
        """When the last resource became all Healthy (after ``since``)."""
        return max(self.first_snapshot(n, since, healthy=True) for n in self.names)

    # -- the node -----------------------------------------------------------------------------

    def start_node(self) -> float:
        """Start ``macvtapdp run``; the time just before its Popen."""
        started = time.monotonic()
        self.node.start(*([f"--metrics-address={METRICS_ADDRESS}"] if self.metrics else []))
        return started

    def sigterm_node(self) -> tuple[float, list[str], list[int]]:
        """SIGTERM supervisord: (seconds to its exit, our sockets left, processes left)."""
        proc = self.node.proc
        assert proc is not None
        children = list(self.program_pids().values())
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(STEP_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            raise BenchError("supervisord did not exit on SIGTERM within 15 s") from None
        took = time.monotonic() - started
        proc.wait()  # collect the rest of its output
        return took, self.own_sockets(), [pid for pid in children if alive(pid)]

    def own_sockets(self) -> list[str]:
        return [f for f in os.listdir(self.node.plugin_dir) if f.startswith(f"{RESOURCE_DOMAIN}_")]

    def programs(self) -> dict[str, dict[str, Any]]:
        """supervisord's view: program name -> ``getProcessInfo``."""
        return self.node.processes()

    def program_pids(self) -> dict[str, int]:
        """supervisord's programs (``resource-<name>``, ``watchdog``) and their pids."""
        return {name: int(info["pid"]) for name, info in self.programs().items() if info["pid"]}

    def wait_running(self, program: str, not_pid: int = 0) -> None:
        """Until supervisord has ``program`` RUNNING (past startsecs), not as ``not_pid``."""

        def running() -> bool:
            info = self.programs().get(program, {})
            return info.get("statename") == "RUNNING" and int(str(info.get("pid", 0))) != not_pid

        if not until(running, STEP_TIMEOUT, interval=0.05):
            raise BenchError(f"{program} is not RUNNING in supervisord")

    def memory(self) -> list[ProcMem]:
        """Memory of supervisord and each of its programs."""
        proc = self.node.proc
        assert proc is not None
        found = [proc_memory("supervisord", proc.pid)]
        found += [proc_memory(name, pid) for name, pid in sorted(self.program_pids().items())]
        return [m for m in found if m is not None]

    def cpu_seconds(self, program: str) -> float:
        """User and system CPU time ``program`` has used so far."""
        pid = self.program_pids()[program]
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def http_get(self, path: str) -> tuple[int, str]:
        """GET ``path`` from the node's metrics endpoint."""
        return self.node.http_get(path)

    def log_lines(self) -> list[str]:
        return list(self.node.output.lines) if self.node.proc else []

    def log_time(self, pattern: str, start: int = 0) -> float | None:
        """The monotonic time of the first log line from ``start`` matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.log_lines()[start:]:
            stamp = _LOG_TIME.match(line)
            if stamp and regex.search(line):
                wall = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
                return wall.timestamp() - self.clock_offset
        return None

    @contextlib.contextmanager
    def log_on_failure(self, lines: int = 60) -> Iterator[None]:
        """A failure's message carries the end of the node's log: the why is usually there."""
        try:
            yield
        except BenchError as err:
            tail = "\n".join(self.log_lines()[-lines:])
            raise BenchError(f"{err}\n--- the node's last {lines} log lines ---\n{tail}") from err

    def wait_log(self, pattern: str, start: int, timeout: float = STEP_TIMEOUT) -> None:
        if not self.node.output.wait_for(pattern, timeout, start=start):
            raise BenchError(f"no log line matching {pattern!r} within {timeout:g} s")

    # -- the netns ------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        link = self.rtnl.link(name=name)
        return link.index if link else None

    def delete_macvtaps(self, lower: str | None = None) -> int:
        """Delete the macvtaps (on ``lower`` only, if given); how many."""
        lower_index = self.link_index(lower) if lower else None
        gone = 0
        for link in self.rtnl.links():
            if link.kind != "macvtap":
                continue
            if lower_index is not None and link.lower_index != lower_index:
                continue
            with contextlib.suppress(OSError):
                self.rtnl.delete(link.index)
                gone += 1
        return gone

    def _stop_node(self) -> None:
        if self.node.proc is not None:
            self.node.proc.terminate(timeout=5.0)

    def _kill_everything_in_netns(self) -> None:
        """Whatever still runs in our netns was started by us (orphaned serves): SIGKILL it."""
        done = subprocess.run(
            ["ip", "netns", "pids", self.ns.name], capture_output=True, text=True, check=False
        )
        pids = [int(p) for p in done.stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _delete_lower_links(self) -> None:
        """Lower links first: that takes their macvtaps (and /dev/tapN) with them at once."""
        for name in self.names:
            self.ns.ip("link", "del", "dev", name, check=False)
