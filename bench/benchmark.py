"""Measure macvtapdp against the targets of DESIGN.md ("Targets") and print how it fares.

Run as root from the repository root (the package installed in the venv):

    sudo .venv/bin/python bench/benchmark.py [--resources N] [--capacity C] [--rounds R]
        [--allocations A] [--json PATH|-] [--scaling] [--metrics]

It builds its own network namespace (one veth lower link per resource), a short plugin
directory and the kubelet stand-in of ``harness/``, runs the real ``macvtapdp run``
(supervisord and one resource process per resource), measures every figure R times and prints a
table (median / max against the target) and JSON with every sample and the machine's
details (default ``/tmp/macvtapdp-bench-<time>.json``). ``--scaling`` then runs the key
figures again for 1, 3 and 10 resources (capacity 100) and for capacity 10, 100 and 1000
(one resource) and prints how they grow. ``--metrics`` runs the node with its metrics
endpoint (off otherwise) and also measures it: scrape time, CPU per scrape and per probe,
its memory. Everything it makes is removed on exit, Ctrl-C,
SIGTERM and failure. Times are end to end as the kubelet stand-in sees them, so they
include the stand-in's own (Python gRPC) overhead; the "floor" rows show how much. Run on
a quiet machine for figures to keep: on a busy one every figure is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: tests/ and bench/ come from the checkout
    sys.path.insert(0, REPO)
# gRPC's C core logs every GOAWAY of the stand-in at INFO unless told otherwise
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from bench.rig import (  # noqa: E402
    START_TIMEOUT,
    STEP_TIMEOUT,
    BenchError,
    ProcMem,
    Rig,
    StampedLinkEvents,
    is_link,
    median,
    percentile,
)
from harness.processes import (  # noqa: E402
    RESOURCE_DOMAIN,
    all_healthy,
    all_unhealthy,
)
from macvtapdp.linux.linkevents import DELLINK as RTM_DELLINK  # noqa: E402
from macvtapdp.linux.linkevents import NEWLINK as RTM_NEWLINK  # noqa: E402

SCALING = [(1, 100), (3, 100), (10, 100), (1, 10), (1, 1000)]  # (resources, capacity)
ALLOC_WINDOW = 20  # macvtaps per resource left in the netns while timing Allocate
PACKAGES = ("macvtapdp", "grpcio", "protobuf", "supervisor", "xxhash", "prometheus-client")


# -- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One figure of the table: which samples, summarised how, against which target."""

    label: str
    series: str  # the samples it is computed from (several figures can share a series)
    target: float | None  # upper bound in ``unit``; None: shown for information
    go: str  # what the Go original does here (DESIGN.md)
    summary: str = "rounds"  # rounds: median / max; pNN: that percentile; max: the largest
    unit: str = "ms"


SPECS: dict[str, Spec] = {
    "kubelet_to_healthy": Spec(
        "kubelet socket appears -> all Healthy", "kubelet_to_healthy", 250, "10-21 s"
    ),
    "kubelet_late_to_healthy": Spec(
        "  same, plugins started first (kubelet late)", "kubelet_late_to_healthy", 250, "21 s"
    ),
    "cold_start": Spec("`macvtapdp run` -> all Healthy (kubelet up)", "cold_start", 2000, "10 s"),
    "link_down_to_unhealthy": Spec(
        "lower link set down -> Unhealthy (kernel event)",
        "link_down_to_unhealthy",
        100,
        "never",
    ),
    "link_down_from_ip": Spec("  same, from `ip` start", "link_down_from_ip", None, ""),
    "link_deleted_to_unhealthy": Spec(
        "lower link deleted -> Unhealthy (kernel event)",
        "link_deleted_to_unhealthy",
        100,
        "0-10 s",
    ),
    "link_deleted_from_ip": Spec("  same, from `ip` start", "link_deleted_from_ip", None, ""),
    "link_up_to_healthy": Spec(
        "lower link set up -> Healthy (kernel event)", "link_up_to_healthy", 250, "9-10 s"
    ),
    "link_up_from_ip": Spec("  same, from `ip` start", "link_up_from_ip", None, ""),
    "link_created_to_healthy": Spec(
        "lower link created -> Healthy (kernel event)",
        "link_created_to_healthy",
        250,
        "9-10 s",
    ),
    "link_created_from_ip": Spec("  same, from first `ip` start", "link_created_from_ip", None, ""),
    "kubelet_restart_to_healthy": Spec(
        "kubelet restart -> re-registered, all Healthy",
        "kubelet_restart_to_healthy",
        500,
        "10 s",
    ),
    "kubelet_restart_from_socket": Spec(
        "  same, from the new kubelet.sock", "kubelet_restart_from_socket", None, ""
    ),
    "kill_to_reregistered": Spec(
        "one resource kill -9 -> back, registered, Healthy",
        "kill_to_reregistered",
        2000,
        "all resources down",
    ),
    "allocate_p50": Spec("Allocate p50 (new macvtap)", "allocate", 1.5, "1.0 ms", "p50"),
    "allocate_p90": Spec("Allocate p90 (new macvtap)", "allocate", None, "", "p90"),
    "allocate_p99": Spec("Allocate p99 (new macvtap)", "allocate", 5.0, "5.4 ms", "p99"),
    "allocate_plugin_p50": Spec(
        "  inside the plugin p50 (its log line)", "allocate_plugin", None, "", "p50"
    ),
    "allocate_plugin_p99": Spec(
        "  inside the plugin p99 (its log line)", "allocate_plugin", None, "", "p99"
    ),
    "allocate_reuse_p50": Spec("Allocate p50 (same ID again)", "allocate_reuse", None, "", "p50"),
    "allocate_reuse_p99": Spec("Allocate p99 (same ID again)", "allocate_reuse", None, "", "p99"),
    "rpc_floor_p50": Spec(
        "  floor: gRPC round trip p50 (GetDevicePluginOptions)", "rpc_floor", None, "", "p50"
    ),
    "kernel_floor_p50": Spec(
        "  floor: bare netlink macvtap create p50 (in-process)", "kernel_floor", None, "", "p50"
    ),
    "serve_rss": Spec(
        "memory: RSS of a resource process (max)",
        "serve_rss",
        56,
        "11 MiB, 1 process",
        "max",
        "MiB",
    ),
    "serve_pss": Spec("memory: PSS of a resource process (max)", "serve_pss", 40, "", "max", "MiB"),
    "node_pss": Spec("memory: PSS of the whole tree (max)", "node_pss", None, "", "max", "MiB"),
    "sigterm_to_exit": Spec(
        "SIGTERM -> exit, sockets removed", "sigterm_to_exit", 2000, "exits, sockets left"
    ),
    # --metrics: the endpoint (its own process), scraped and probed as the cluster would
    "scrape_p50": Spec("GET /metrics p50", "scrape", None, "", "p50"),
    "scrape_cpu": Spec("  CPU of the endpoint per /metrics (mean)", "scrape_cpu", None, ""),
    "healthz_cpu": Spec("probe cost: CPU per httpGet /healthz (mean)", "healthz_cpu", 60, ""),
    "readyz_cpu": Spec("probe cost: CPU per httpGet /readyz (mean)", "readyz_cpu", 150, ""),
    "metrics_rss": Spec(
        "memory: RSS of the metrics endpoint (max)", "metrics_rss", None, "", "max", "MiB"
    ),
}
SCALING_FIGURES = [
    "cold_start",
    "kubelet_restart_to_healthy",
    "link_down_to_unhealthy",
    "allocate_p50",
    "allocate_p99",
    "serve_rss",
    "sigterm_to_exit",
]


@dataclass
class Params:
    resources: int
    capacity: int
    rounds: int
    allocations: int
    full: bool = True  # False: only the scaling figures
    metrics: bool = False  # the node serves metrics (--metrics-address)


@dataclass
class Results:
    """Samples of one run: ``series`` feed the figures, ``side`` explain them."""

    params: Params
    series: dict[str, list[float]] = field(default_factory=dict)
    side: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    memory: dict[str, list[ProcMem]] = field(default_factory=dict)

    def add(self, series: str, value: float) -> None:
        self.series.setdefault(series, []).append(value)

    def explain(self, series: str, name: str, value: float) -> None:
        self.side.setdefault(series, {}).setdefault(name, []).append(value)

    def problem(self, series: str, text: str) -> None:
        self.problems.setdefault(series, []).append(text)

    def figure(self, key: str) -> Figure | None:
        spec = SPECS[key]
        samples = self.series.get(spec.series)
        if not samples:
            return None
        return Figure(key, spec, samples, self.problems.get(spec.series, []))


@dataclass(frozen=True)
class Figure:
    key: str
    spec: Spec
    samples: list[float]
    problems: list[str]

    @property
    def value(self) -> float:
        """The figure compared with the target."""
        how = self.spec.summary
        if how == "max":
            return max(self.samples)
        if how.startswith("p"):
            return percentile(self.samples, float(how[1:]))
        return median(self.samples)

    @property
    def worst(self) -> float:
        return max(self.samples)

    def ours(self) -> str:
        if self.spec.summary == "rounds":
            return f"{_num(self.value)} / {_num(self.worst)}"
        if self.spec.summary == "max":
            return _num(self.value)
        return f"{_num(self.value)} (max {_num(self.worst)})"

    def verdict(self) -> str:
        """yes (even the worst sample), median only, NO, or info (no target)."""
        if self.problems:
            return "NO: " + "; ".join(self.problems[:2])
        target = self.spec.target
        if target is None:
            return "info"
        if self.spec.summary == "rounds" and self.worst <= target:
            return "yes"
        if self.value <= target:
            return "median only" if self.spec.summary == "rounds" else "yes"
        return "NO"


def _num(value: float) -> str:
    """Three significant digits or so: 1234, 123, 12.3, 1.23."""
    if math.isnan(value):
        return "-"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{digits}f}"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def say(text: str) -> None:
    """Progress on stderr: the table goes to stdout."""
    print(f"  {text}", file=sys.stderr, flush=True)


# -- the figures ----------------------------------------------------------------------------------


def measure_sigterm(rig: Rig, res: Results) -> None:
    """SIGTERM to supervisord (the pod's SIGTERM): time to its exit, and nothing left."""
    mark = len(rig.log_lines())
    started = time.monotonic()
    took, sockets, left = rig.sigterm_node()
    res.add("sigterm_to_exit", ms(took))
    noticed = rig.log_time("received SIGTERM", mark)
    stops = [rig.log_time(rf"stopped: resource-{re.escape(n)} ", mark) for n in rig.names]
    if noticed is not None:
        res.explain("sigterm_to_exit", "supervisord_noticed", ms(noticed - started))
    if noticed is not None and None not in stops:
        last = max(t for t in stops if t is not None)
        res.explain("sigterm_to_exit", "last_resource_stopped", ms(last - noticed))
    if sockets:
        res.problem("sigterm_to_exit", f"sockets left: {', '.join(sockets)}")
    if left:
        res.problem("sigterm_to_exit", f"processes left: {left}")


def start_breakdown(rig: Rig, res: Results, started: float) -> None:
    """Where a cold start's time goes, from supervisord's and serve's log lines."""
    for name in rig.names:  # the line may trail the stand-in's first snapshot
        rig.wait_log(rf"\[{re.escape(name)}\] registered ", 0)

    def since(pattern: str) -> float:
        at = rig.log_time(pattern)
        return math.nan if at is None else ms(at - started)

    spawned = [since(rf"spawned: 'resource-{re.escape(n)}'") for n in rig.names]
    phases = {
        "supervisord_started": since("supervisord started with pid"),
        "first_spawned": min(spawned),
        "last_spawned": max(spawned),
        "last_serve_ready": max(
            since(rf"\[{re.escape(n)}\] serving {re.escape(RESOURCE_DOMAIN)}/") for n in rig.names
        ),
        "last_registered": max(since(rf"\[{re.escape(n)}\] registered ") for n in rig.names),
    }
    for name, value in phases.items():
        res.explain("cold_start", name, value)


def measure_cold_start(rig: Rig, res: Results, rounds: int) -> None:
    """Popen of ``macvtapdp run`` with the kubelet up, until every device is Healthy."""
    rig.kubelet.start()
    for n in range(rounds):
        before = rig.register_counts()
        started = rig.start_node()
        rig.wait_all_healthy_again(before, START_TIMEOUT)
        took = rig.all_healthy_at(started) - started
        res.add("cold_start", ms(took))
        start_breakdown(rig, res, started)
        measure_sigterm(rig, res)
        say(f"cold start {n + 1}/{rounds}: {ms(took):.0f} ms")


def measure_kubelet_late(rig: Rig, res: Results, rounds: int) -> None:
    """Plugins up and waiting for a kubelet; from ``kubelet.start()`` to all Healthy."""
    for n in range(rounds):
        rig.kubelet.stop()
        before = rig.register_counts()
        rig.start_node()
        for name in rig.names:
            rig.wait_log(rf"\[{re.escape(name)}\] waiting for the kubelet", 0, START_TIMEOUT)
        time.sleep(0.2)  # settled in their wait
        started = time.monotonic()
        rig.kubelet.start()
        rig.wait_all_healthy_again(before)
        took = rig.all_healthy_at(started) - started
        res.add("kubelet_late_to_healthy", ms(took))
        measure_sigterm(rig, res)
        say(f"kubelet late {n + 1}/{rounds}: {ms(took):.0f} ms")


def start_steady(rig: Rig) -> None:
    """Start the node for the figures that need it running and registered."""
    if not rig.kubelet.running:
        rig.kubelet.start()
    before = rig.register_counts()
    rig.start_node()
    rig.wait_all_healthy_again(before, START_TIMEOUT)


def measure_kubelet_to_healthy(rig: Rig, res: Results, rounds: int) -> None:
    """Registered plugins lose the kubelet and wait; from ``kubelet.start()`` to all Healthy."""
    for n in range(rounds):
        mark = len(rig.log_lines())
        rig.kubelet.stop()
        for name in rig.names:
            rig.wait_log(rf"\[{re.escape(name)}\] the kubelet's socket is gone", mark)
        time.sleep(0.1)
        before = rig.register_counts()
        started = time.monotonic()
        rig.kubelet.start()
        rig.wait_all_healthy_again(before)
        took = rig.all_healthy_at(started) - started
        res.add("kubelet_to_healthy", ms(took))
        say(f"kubelet socket appears {n + 1}/{rounds}: {ms(took):.0f} ms")


def link_step(
    rig: Rig,
    res: Results,
    events: StampedLinkEvents,
    name: str,
    keys: tuple[str, str],
    action: Callable[[], object],
    match: Callable[[str, Any], bool],
    healthy: bool,
) -> None:
    """Change lower link ``name`` with ``action``; time the stand-in's first snapshot in the
    new health from the kernel's event (``keys[0]``) and from the start of ``ip`` (``keys[1]``).
    """
    capacity = rig.capacity
    started = time.monotonic()
    action()
    want = all_healthy(capacity) if healthy else all_unhealthy(capacity)
    rig.wait(name, want, "Healthy" if healthy else "Unhealthy", STEP_TIMEOUT)
    event = events.first(started, match)
    snapshot = rig.first_snapshot(name, started, healthy)
    res.add(keys[0], ms(snapshot - event))
    res.add(keys[1], ms(snapshot - started))


def link_round(rig: Rig, res: Results, events: StampedLinkEvents, name: str) -> None:
    """Set lower link ``name`` down and up; then (full run) delete it and create it again."""
    ns = rig.ns

    def step(keys: tuple[str, str], action: Callable[[], object], kind: str, up: bool) -> None:
        match = is_link(name, kind, None if kind == RTM_DELLINK else up)
        link_step(rig, res, events, name, keys, action, match, up)

    down = ("link_down_to_unhealthy", "link_down_from_ip")
    step(down, lambda: ns.ip("link", "set", name, "down"), RTM_NEWLINK, False)
    up = ("link_up_to_healthy", "link_up_from_ip")
    step(up, lambda: ns.ip("link", "set", name, "up"), RTM_NEWLINK, True)
    if res.params.full:
        deleted = ("link_deleted_to_unhealthy", "link_deleted_from_ip")
        step(deleted, lambda: ns.ip("link", "del", name), RTM_DELLINK, False)
        created = ("link_created_to_healthy", "link_created_from_ip")
        step(created, lambda: ns.veth(name), RTM_NEWLINK, True)


def measure_links(rig: Rig, res: Results, rounds: int) -> None:
    """Each lower link in turn changes; the plugin's reaction is timed from the kernel event."""
    with contextlib.closing(StampedLinkEvents(rig.ns)) as events:
        for n in range(rounds):
            name = rig.names[n % len(rig.names)]
            link_round(rig, res, events, name)
            say(f"lower link round {n + 1}/{rounds} on {name}")
        if events.lost:
            res.problem("link_down_to_unhealthy", f"benchmark lost link events {events.lost}x")


def measure_kubelet_restart(rig: Rig, res: Results, rounds: int) -> None:
    """``kubelet.restart()`` (sockets deleted, new kubelet.sock) until all registered again."""
    for n in range(rounds):
        before = rig.register_counts()
        endpoints = {name: rig.kubelet.state(rig.resource(name)).endpoint for name in rig.names}
        started = time.monotonic()
        rig.kubelet.restart()
        restarted = time.monotonic()
        rig.wait_all_healthy_again(before)
        healthy = rig.all_healthy_at(started)
        res.add("kubelet_restart_to_healthy", ms(healthy - started))
        res.explain("kubelet_restart_to_healthy", "stand_in_restart_call", ms(restarted - started))
        new_socket = max(e.time for e in rig.kubelet.events if e.kind == "kubelet-start")
        res.add("kubelet_restart_from_socket", ms(healthy - new_socket))
        for name in rig.names:
            if rig.kubelet.state(rig.resource(name)).endpoint == endpoints[name]:
                res.problem("kubelet_restart_to_healthy", f"{name} reused its socket name")
        say(f"kubelet restart {n + 1}/{rounds}: {ms(healthy - started):.0f} ms")


def measure_kill(rig: Rig, res: Results, rounds: int) -> None:
    """kill -9 of one serve process (in turn): until it is registered and Healthy again;
    the other resources' streams must not notice."""
    watched = ("register", "connected", "superseded", "disconnected", "stream-ended")
    for n in range(rounds):
        victim = rig.names[n % len(rig.names)]
        program = f"resource-{victim}"
        # a kill before supervisord's startsecs would be a start failure (backoff): not this figure
        rig.wait_running(program)
        pid = rig.program_pids()[program]
        before = rig.register_counts()
        mark_events, mark_log = len(rig.kubelet.events), len(rig.log_lines())
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rig.wait(victim, all_healthy(rig.capacity, before[victim]), "back", STEP_TIMEOUT)
        back = rig.first_snapshot(victim, started, healthy=True)
        res.add("kill_to_reregistered", ms(back - started))
        rig.wait_log(rf"\[{re.escape(victim)}\] registered ", mark_log)  # may trail the stream
        phases = {
            "supervisord_reaped": rf"exited: {re.escape(program)} ",
            "supervisord_respawned": rf"spawned: '{re.escape(program)}'",
            "serve_ready": rf"\[{re.escape(victim)}\] serving {re.escape(RESOURCE_DOMAIN)}/",
            "registered": rf"\[{re.escape(victim)}\] registered ",
        }
        for phase, pattern in phases.items():
            at = rig.log_time(pattern, mark_log)
            if at is not None:
                res.explain("kill_to_reregistered", phase, ms(at - started))
        others = [
            e
            for e in rig.kubelet.events[mark_events:]
            if e.resource != rig.resource(victim) and e.kind in watched
        ]
        res.explain("kill_to_reregistered", "others_disturbed", float(len(others)))
        for event in others:
            res.problem("kill_to_reregistered", f"{event.resource}: {event.kind}")
        rig.wait_running(program, not_pid=pid)
        say(f"kill -9 {n + 1}/{rounds} ({victim}): back in {ms(back - started):.0f} ms")


def timed_allocate(rig: Rig, name: str, device: str) -> float:
    """One kubelet-style Allocate of one device; its latency in ms."""
    started = time.monotonic()
    response = rig.kubelet.allocate(rig.resource(name), [device], timeout=STEP_TIMEOUT)
    took = time.monotonic() - started
    [container] = response.container_responses
    [spec] = container.devices
    if not spec.host_path.startswith("/dev/tap") or spec.host_path != spec.container_path:
        raise BenchError(f"Allocate of {device} answered {spec}")
    return ms(took)


def measure_allocate(rig: Rig, res: Results, count: int) -> None:
    """``count`` Allocates, each of a device without a macvtap yet (round robin over the
    resources, IDs cycling through the capacity), then of the same ID again.

    At most ``ALLOC_WINDOW`` macvtaps per resource stay in the netns (older ones are
    deleted, untimed), as on a node, where the CNI moves each macvtap into its pod: the
    kernel's per-device IPv6 routes make creating the n-th macvtap of one netns O(n)
    (about 0.5 ms at 100, 2 ms at 1000 here), which would otherwise swamp the figure.
    """
    window = min(ALLOC_WINDOW, rig.capacity)
    made = dict.fromkeys(rig.names, 0)
    last = dict.fromkeys(rig.names, "")
    logged = len(rig.node.output.lines)
    for n in range(count):
        name = rig.names[n % len(rig.names)]
        if made[name] % window == 0 and made[name]:
            rig.delete_macvtaps(name)
        last[name] = f"{name}Mvp{made[name] % rig.capacity}"
        res.add("allocate", timed_allocate(rig, name, last[name]))
        made[name] += 1
    for line in rig.node.output.lines[logged:]:  # "allocated X: ... (created in 0.71 ms)"
        if found := re.search(r"\(created in ([0-9.]+) ms\)", line):
            res.add("allocate_plugin", float(found.group(1)))
    for n in range(max(count // 3, len(rig.names)) if res.params.full else 0):
        name = rig.names[n % len(rig.names)]
        if last[name]:
            res.add("allocate_reuse", timed_allocate(rig, name, last[name]))
    if res.params.full:
        measure_floors(rig, res, max(count // 3, 10))
    samples = res.series.get("allocate", [])
    say(f"{count} allocations: p50 {percentile(samples, 50):.2f} ms")


def measure_floors(rig: Rig, res: Results, count: int) -> None:
    """What Allocate cannot go below here, now: the stand-in's gRPC round trip to a serve
    process with no work (GetDevicePluginOptions), and a macvtap create with no gRPC."""
    for n in range(count):
        name = rig.names[n % len(rig.names)]
        started = time.monotonic()
        rig.kubelet.get_options(rig.resource(name), timeout=STEP_TIMEOUT)
        res.add("rpc_floor", ms(time.monotonic() - started))
    lower = rig.rtnl.link(name=rig.names[0])
    if lower is None:
        raise BenchError(f"lower link {rig.names[0]} is gone")
    for n in range(count):
        started = time.monotonic()
        rig.rtnl.add_macvtap(f"mdpbench{n}", lower.index, "bridge", index=(1 << 30) + 7000 + n)
        res.add("kernel_floor", ms(time.monotonic() - started))
        rig.rtnl.delete((1 << 30) + 7000 + n)


def measure_memory(rig: Rig, res: Results, phase: str) -> None:
    """RSS, PSS and USS of every process of the tree (``phase``: when)."""
    found = rig.memory()
    res.memory[phase] = found
    for mem in found:
        if mem.name.startswith("resource-"):
            res.add("serve_rss", mem.rss)
            res.add("serve_pss", mem.pss)
        elif mem.name == "metrics":
            res.add("metrics_rss", mem.rss)
    res.add("node_pss", round(sum(m.pss for m in found), 2))


def measure_endpoint(rig: Rig, res: Results, count: int) -> None:
    """GET /metrics, /healthz and /readyz ``count`` times each: latency, and the endpoint's
    CPU per call (what an httpGet probe costs the node, instead of an exec'd ``status``)."""
    for path, series in (("/metrics", "scrape"), ("/healthz", "healthz"), ("/readyz", "readyz")):
        cpu = rig.cpu_seconds("metrics")
        for _ in range(count):
            started = time.monotonic()
            status, body = rig.http_get(path)
            took = time.monotonic() - started
            if status != 200:
                raise BenchError(f"GET {path} answered {status}: {body[:200]}")
            if series == "scrape":
                res.add("scrape", ms(took))
        res.add(f"{series}_cpu", ms((rig.cpu_seconds("metrics") - cpu) / count))
    say(f"endpoint: GET /metrics p50 {percentile(res.series['scrape'], 50):.2f} ms")


def run_suite(params: Params) -> Results:
    """Every figure (or, with ``params.full`` False, the scaling ones) on a fresh rig."""
    res = Results(params)
    full, rounds = params.full, params.rounds
    metrics = ", metrics on" if params.metrics else ""
    say(f"{params.resources} resources x capacity {params.capacity}, {rounds} rounds{metrics}")
    with Rig(params.resources, params.capacity, params.metrics) as rig, rig.log_on_failure():
        measure_cold_start(rig, res, rounds)
        if full:
            measure_kubelet_late(rig, res, rounds)
        start_steady(rig)
        measure_memory(rig, res, "idle")
        if full:
            measure_kubelet_to_healthy(rig, res, rounds)
        measure_links(rig, res, rounds)
        measure_kubelet_restart(rig, res, rounds)
        if full:
            measure_kill(rig, res, rounds)
        measure_allocate(rig, res, params.allocations)
        if params.metrics:
            measure_endpoint(rig, res, 50)
        measure_memory(rig, res, "after allocations")
        measure_sigterm(rig, res)
    return res


# -- reporting ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _target(spec: Spec) -> str:
    return "-" if spec.target is None else f"<= {_num(spec.target)} {spec.unit}"


def render(res: Results) -> str:
    p = res.params
    rows = []
    for key, spec in SPECS.items():
        fig = res.figure(key)
        if fig is not None:
            rows.append(
                [spec.label, _target(spec), spec.go, f"{fig.ours()} {spec.unit}", fig.verdict()]
            )
    headers = ["figure", "target", "Go original", "ours (median / max)", "met?"]
    title = (
        f"macvtapdp: {p.resources} resources x capacity {p.capacity}, {p.rounds} rounds, "
        f"{p.allocations} allocations" + (", metrics on" if p.metrics else ", metrics off")
    )
    return "\n".join([title, table(headers, rows), *explanations(res)])


def explanations(res: Results) -> list[str]:
    """Medians of the side measurements: where the time of a figure goes."""
    lines = []
    for series, sides in res.side.items():
        shown = ", ".join(f"{name} {_num(median(values))}" for name, values in sides.items())
        lines.append(f"{series} (medians, ms): {shown}")
    for phase, mems in res.memory.items():
        shown = ", ".join(f"{m.name} {m.rss:.1f}/{m.pss:.1f}/{m.uss:.1f}" for m in mems)
        lines.append(f"memory {phase} (RSS/PSS/USS MiB): {shown}")
    return lines


def render_scaling(runs: Sequence[Results]) -> str:
    headers = ["figure", *(f"{r.params.resources} x {r.params.capacity}" for r in runs)]
    rows = []
    for key in SCALING_FIGURES:
        spec = SPECS[key]
        row = [f"{spec.label} [{spec.unit}]"]
        for run in runs:
            fig = run.figure(key)
            row.append("-" if fig is None else _num(fig.value))
        rows.append(row)
    return "\n".join(
        ["scaling (resources x capacity; medians, or the percentile)", table(headers, rows)]
    )


def as_json(res: Results) -> dict[str, Any]:
    figures = {}
    for key in SPECS:
        fig = res.figure(key)
        if fig is not None:
            figures[key] = {
                **asdict(fig.spec),
                "value": fig.value,
                "median": median(fig.samples),
                "max": fig.worst,
                "met": fig.verdict(),
            }
    return {
        "params": {**asdict(res.params), "alloc_window": ALLOC_WINDOW},
        "figures": figures,
        "samples": res.series,
        "explanations": res.side,
        "problems": res.problems,
        "memory": {phase: [asdict(m) for m in mems] for phase, mems in res.memory.items()},
    }


def machine() -> dict[str, Any]:
    """What the figures depend on: kernel, CPUs, Python, package versions, load."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        model = next(
            (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), ""
        )
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    commit = subprocess.run(
        ["git", "-C", REPO, "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "packages": versions,
        "commit": commit,
        "loadavg": os.getloadavg(),
    }


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--resources", type=int, default=3, help="resources (lower links), default 3")
    p.add_argument("--capacity", type=int, default=100, help="devices per resource, default 100")
    p.add_argument("--rounds", type=int, default=5, help="rounds per figure, default 5")
    p.add_argument("--allocations", type=int, default=300, help="Allocates timed, default 300")
    p.add_argument("--json", default=None, help="where to write the JSON ('-': stdout)")
    p.add_argument("--scaling", action="store_true", help="also 1-10 resources, capacity 10-1000")
    p.add_argument("--scaling-rounds", type=int, default=3, help="rounds per scaling figure")
    p.add_argument(
        "--metrics", action="store_true", help="serve metrics (and measure the endpoint)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.resources <= 50 or not 1 <= args.capacity <= 1000 or args.rounds < 1:
        p.error("need 1 <= resources <= 50, 1 <= capacity <= 1000, rounds >= 1")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every rig's cleanup


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("benchmark: run as root (network namespaces, macvtap, supervisord)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    report: dict[str, Any] = {"machine": machine(), "started": time.strftime("%FT%T%z")}
    began = time.monotonic()
    try:
        params = Params(
            args.resources, args.capacity, args.rounds, args.allocations, metrics=args.metrics
        )
        main_run = run_suite(params)
        print(render(main_run), flush=True)
        report["run"] = as_json(main_run)
        if args.scaling:
            runs = [
                run_suite(
                    Params(
                        r, c, args.scaling_rounds, min(args.allocations, 150), False, args.metrics
                    )
                )
                for r, c in SCALING
            ]
            print("\n" + render_scaling(runs), flush=True)
            report["scaling"] = [as_json(r) for r in runs]
    except KeyboardInterrupt:
        print("benchmark: interrupted; everything it made is removed", file=sys.stderr)
        return 130
    except BenchError as err:
        print(f"benchmark: failed: {err}", file=sys.stderr)
        return 1
    report["duration_s"] = round(time.monotonic() - began, 1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    write_json(report, args.json)
    return 0


def write_json(report: dict[str, Any], path: str | None) -> None:
    text = json.dumps(report, indent=1, default=str)
    if path == "-":
        print(text)
        return
    path = path or f"/tmp/macvtapdp-bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    print(f"\nJSON with every sample: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
