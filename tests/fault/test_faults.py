"""Fault injection: the plugin loses nothing when its world misbehaves (issue #6).

Five scenarios, each against the real kernel in its own netns and the kubelet stand-in:
lower-link flaps at 10 Hz, kill -9 of random resource processes under supervisord,
kubelet restarts in a row, a thousand allocations (some concurrent), and malformed
Allocate requests. Bounds are generous ("back within 10 s"): this suite checks that
nothing is lost, leaked or broken; the benchmark (bench/) measures how fast.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from harness.kubelet import FakeKubelet, ResourceState
from harness.netns import NetNS
from harness.processes import (
    RESOURCE_DOMAIN,
    Node,
    Proc,
    all_healthy,
    all_unhealthy,
    resource,
    rmtree,
    serve_argv,
    short_tempdir,
    until,
)
from macvtapdp.naming import interface_name

pytestmark = [pytest.mark.fault, pytest.mark.kernel]

BACK = 10.0  # "comes back": generous on a busy 2-core machine
# kubelet events that mean a resource's registration or stream changed
DISTURBANCES = ("register", "connected", "superseded", "disconnected", "stream-ended")

Predicate = Callable[[ResourceState], bool]


def disturbances(kubelet: FakeKubelet, name: str, since: int) -> list[str]:
    """What happened to ``name``'s registration or stream after event number ``since``."""
    return [
        f"{e.kind}: {e.detail}"
        for e in kubelet.events[since:]
        if e.resource == resource(name) and e.kind in DISTURBANCES
    ]


def own_sockets(plugin_dir: str) -> list[str]:
    return sorted(f for f in os.listdir(plugin_dir) if f.startswith(f"{RESOURCE_DOMAIN}_"))


def kill_all_in(ns: NetNS) -> None:
    """SIGKILL whatever still runs in the test's netns (only the test started anything there)."""
    done = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True)
    for pid in (int(p) for p in done.stdout.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Footprint:
    """What a leak would grow: threads, file descriptors, sockets among them, and netlink
    sockets among those (the bound ones: /proc/net/netlink lists no other)."""

    threads: int
    fds: int
    sockets: int
    netlink: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        threads = len(os.listdir(f"/proc/{pid}/task"))
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed while we looked
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        sockets = {int(t[len("socket:[") : -1]) for t in targets if t.startswith("socket:[")}
        with open(f"/proc/{pid}/net/netlink", encoding="ascii") as fh:  # the process's netns
            netlink = {int(line.split()[-1]) for line in list(fh)[1:] if line.strip()}
        return cls(threads, len(targets), len(sockets), len(sockets & netlink))


# -- one serve process ----------------------------------------------------------------------------


@dataclass
class Single:
    """``macvtapdp serve`` processes under the kubelet stand-in, in one netns."""

    ns: NetNS
    plugin_dir: str
    kubelet: FakeKubelet
    procs: list[Proc] = field(default_factory=list)

    def serve(self, name: str, capacity: int) -> Proc:
        self.ns.veth(name)
        argv = serve_argv(name, self.plugin_dir, f"--lower={name}", f"--capacity={capacity}")
        proc = Proc(self.ns, argv)
        self.procs.append(proc)
        return proc

    def wait(self, name: str, predicate: Predicate, what: str, timeout: float = BACK) -> None:
        ok = self.kubelet.wait_for(resource(name), predicate, timeout)
        assert ok, f"{name} not {what} within {timeout} s: {self.kubelet.state(resource(name))}"


@pytest.fixture
def single(netns: NetNS) -> Iterator[Single]:
    plugin_dir = short_tempdir()
    s = Single(netns, plugin_dir, FakeKubelet(plugin_dir))
    s.kubelet.start()
    try:
        yield s
    finally:
        codes = [p.terminate() for p in s.procs]
        s.kubelet.stop()
        rmtree(plugin_dir)
        for p in s.procs:
            assert "Traceback" not in p.output.text(), p.output.text()
        assert all(c == 0 for c in codes), codes


# -- macvtapdp run --------------------------------------------------------------------------------

NAMES = ["fl0", "fl1", "fl2"]


@dataclass
class Cluster:
    """``macvtapdp run`` with three resources (one veth lower link each) and the stand-in."""

    node: Node
    capacity: int

    @property
    def kubelet(self) -> FakeKubelet:
        return self.node.kubelet

    def wait(self, name: str, predicate: Predicate, what: str, timeout: float = BACK) -> None:
        ok = self.kubelet.wait_for(resource(name), predicate, timeout)
        assert ok, f"{name} not {what} within {timeout} s: {self.kubelet.state(resource(name))}"

    def state(self, name: str) -> ResourceState:
        return self.kubelet.state(resource(name))

    def programs(self) -> dict[str, dict[str, Any]]:
        return self.node.processes()

    def wait_running(self, program: str, not_pid: int = 0) -> int:
        """Until supervisord has ``program`` RUNNING (past startsecs) as a pid but ``not_pid``."""

        def running() -> bool:
            info = self.programs().get(program, {})
            return info.get("statename") == "RUNNING" and info.get("pid") not in (0, not_pid)

        assert until(running, BACK, interval=0.05), self.programs().get(program)
        return int(self.programs()[program]["pid"])


@pytest.fixture
def cluster(netns: NetNS, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Started and all Healthy; ``capacity`` from ``@pytest.mark.parametrize(indirect)``."""
    capacity: int = getattr(request, "param", 8)
    for name in NAMES:
        netns.veth(name)
    conf = [{"name": n, "master": n, "capacity": capacity} for n in NAMES]
    node = Node(netns, {"DP_MACVTAP_CONF": json.dumps(conf)})
    c = Cluster(node, capacity)
    try:
        node.kubelet.start()
        node.start()
        for name in NAMES:
            c.wait(name, all_healthy(capacity), "Healthy after start", timeout=30)
        yield c
    finally:
        code = node.stop()
        kill_all_in(netns)
        for name in NAMES:  # takes their macvtaps with them, faster than one by one
            netns.ip("link", "del", name, check=False)
        output = node.output.text() if node.proc else ""
        assert "Traceback" not in output, output
        assert code == 0, output[-3000:]


# -- 1. lower-link flaps --------------------------------------------------------------------------


def flap(ns: NetNS, link: str, seconds: float, hz: float, end: str) -> int:
    """Set ``link`` down and up ``hz`` times a second for ``seconds``, ending ``end``."""
    transitions = int(seconds * hz * 2) + (1 if end == "down" else 0)
    start = time.monotonic()
    for n in range(transitions):
        delay = start + n / (hz * 2) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ns.ip("link", "set", link, "down" if n % 2 == 0 else "up")
    return transitions


@pytest.mark.timeout(90)
@pytest.mark.parametrize("end", ["up", "down"])
def test_lower_link_flapping_at_10_hz_loses_nothing(single: Single, end: str) -> None:
    name, capacity = "fp0", 4
    proc = single.serve(name, capacity)
    single.wait(name, all_healthy(capacity), "Healthy")
    time.sleep(0.5)  # let gRPC's threads settle before the baseline
    before = Footprint.of(proc.pid)
    mark = len(single.kubelet.events)

    flap(single.ns, name, seconds=10, hz=10, end=end)

    link = single.ns.link(name)
    assert link is not None
    really_up = "UP" in link["flags"] and link["operstate"] in ("UP", "UNKNOWN")
    assert really_up == (end == "up"), link
    if really_up:
        single.wait(name, all_healthy(capacity), "Healthy like its link")
    else:
        single.wait(name, all_unhealthy(capacity), "Unhealthy like its link")
    time.sleep(0.3)  # a late, stale snapshot would land now
    state = single.kubelet.state(resource(name))
    assert state.allocatable == (capacity if really_up else 0), state
    assert state.register_count == 1 and state.connected, state
    assert disturbances(single.kubelet, name, mark) == []
    flips = len(single.kubelet.history(resource(name)))
    assert flips > 10, f"only {flips} snapshots: the flaps were not seen"
    settled = until(lambda: Footprint.of(proc.pid) == before, timeout=5.0, interval=0.1)
    assert settled, f"leak: before {before}, after {Footprint.of(proc.pid)}"
    assert " ERROR " not in proc.output.text(), proc.output.text()


# -- 2. kill -9 of random resource processes ------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_twenty_kill_9_of_random_resources(cluster: Cluster) -> None:
    rng = random.Random(6)
    kubelet, cap = cluster.kubelet, cluster.capacity
    killed = dict.fromkeys(NAMES, 0)
    for round_ in range(20):
        victim = rng.choice(NAMES)
        program = f"resource-{victim}"
        # a kill before startsecs would be a start failure (supervisord backoff), another test
        pid = cluster.wait_running(program)
        counts = {n: cluster.state(n).register_count for n in NAMES}
        mark = len(kubelet.events)

        os.kill(pid, signal.SIGKILL)

        cluster.wait(victim, all_healthy(cap, counts[victim]), f"back (round {round_})")
        cluster.wait_running(program, not_pid=pid)
        killed[victim] += 1
        for other in NAMES:
            if other == victim:
                continue
            state = cluster.state(other)
            assert state.register_count == counts[other], (round_, other, state)
            assert state.connected and state.allocatable == cap, (round_, other, state)
            assert disturbances(kubelet, other, mark) == [], (round_, other)
    assert all(killed.values()), killed  # the seed kills every resource at least once
    # every killed process's socket was cleaned up by its successor
    endpoints = sorted(str(cluster.state(n).endpoint) for n in NAMES)
    assert own_sockets(cluster.node.plugin_dir) == endpoints


# -- 3. kubelet restarts in a row -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_ten_kubelet_restarts_in_a_row(cluster: Cluster) -> None:
    kubelet, cap = cluster.kubelet, cluster.capacity
    first = {n: cluster.state(n).register_count for n in NAMES}
    for round_ in range(10):
        before = {n: cluster.state(n) for n in NAMES}
        kubelet.restart()
        for name in NAMES:
            old = before[name]

            def again(s: ResourceState, old: ResourceState = old) -> bool:
                return all_healthy(cap, old.register_count)(s) and s.endpoint != old.endpoint

            cluster.wait(name, again, f"registered again on a new socket (restart {round_})")
    time.sleep(1.0)  # a spurious extra registration would show by now
    for name in NAMES:
        state = cluster.state(name)
        assert state.register_count == first[name] + 10, (name, state)
        assert state.connected and state.allocatable == cap, (name, state)
    endpoints = sorted(str(cluster.state(n).endpoint) for n in NAMES)
    assert own_sockets(cluster.node.plugin_dir) == endpoints


# -- 4. a thousand allocations --------------------------------------------------------------------


def chunks(ids: Sequence[str], sizes: Iterator[int]) -> list[list[str]]:
    """``ids`` cut into requests of the given sizes (the kubelet asks 1..n per container)."""
    out: list[list[str]] = []
    rest = list(ids)
    while rest:
        size = next(sizes)
        out.append(rest[:size])
        rest = rest[size:]
    return out


@pytest.mark.e2e
@pytest.mark.timeout(150)
@pytest.mark.parametrize("cluster", [400], indirect=True)
def test_a_thousand_allocations_make_one_live_macvtap_each(cluster: Cluster) -> None:
    kubelet, ns = cluster.kubelet, cluster.node.ns
    per_resource = [[f"{n}Mvp{i}" for i in range(334)] for n in NAMES]
    plan = [i for row in zip(*per_resource, strict=True) for i in row][:1000]
    owner = {dev: dev.split("Mvp")[0] for dev in plan}
    paths: dict[str, str] = {}
    lock = threading.Lock()

    def allocate(ids: list[str]) -> None:
        response = kubelet.allocate(resource(owner[ids[0]]), ids, timeout=30)
        [container] = response.container_responses
        got = [d.host_path for d in container.devices]
        assert len(got) == len(ids), (ids, response)
        assert all(
            d.container_path == d.host_path and d.permissions == "rw" for d in container.devices
        )
        with lock:
            for dev, path in zip(ids, got, strict=True):
                assert paths.setdefault(dev, path) == path, f"{dev}: {paths[dev]} then {path}"

    for dev in plan[:100]:  # one at a time, as the kubelet does
        allocate([dev])
    requests = []  # the rest in requests of 1-4 devices of one resource, from 8 threads at once
    for name in NAMES:
        mine = [d for d in plan[100:] if owner[d] == name]
        requests += chunks(mine, itertools.cycle([1, 1, 2, 1, 4, 3]))
    random.Random(1000).shuffle(requests)
    # and some again while others are still being made: the same tap must come back
    again = [[d] for d in random.Random(7).sample(plan[:100], 50)]
    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(allocate, r) for r in requests + again]:
            future.result()

    assert sorted(paths) == sorted(plan)
    assert len(set(paths.values())) == len(plan), "two devices got the same tap"
    links = {link["ifname"]: link for link in ns.links()}
    macvtaps = [
        n for n, link in links.items() if link.get("linkinfo", {}).get("info_kind") == "macvtap"
    ]
    assert sorted(macvtaps) == sorted(interface_name(d) for d in plan), "not one macvtap per ID"
    for dev, path in paths.items():
        ifname = interface_name(dev)
        link = links[ifname]
        assert link["link"] == owner[dev], (dev, link)
        assert link["linkinfo"]["info_data"]["mode"] == "bridge", (dev, link)
        assert "UP" in link["flags"], (dev, link)
        assert path == f"/dev/tap{link['ifindex']}", (dev, path, link["ifindex"])
        node = os.stat(path)
        assert stat.S_ISCHR(node.st_mode), path
        owner_path = os.readlink(f"/sys/dev/char/{os.major(node.st_rdev)}:{os.minor(node.st_rdev)}")
        assert owner_path.endswith(f"/net/{ifname}/macvtap/tap{link['ifindex']}"), (
            path,
            owner_path,
        )
    for name in NAMES:
        state = cluster.state(name)
        assert state.register_count == 1 and state.connected, (name, state)


# -- 5. malformed Allocate requests ---------------------------------------------------------------

HUGE = 100_000


@pytest.mark.timeout(90)
def test_bad_allocate_requests_are_refused_and_make_nothing(single: Single) -> None:
    a, b, cap = "fa0", "fb0", 4
    single.serve(a, cap)
    single.serve(b, cap)
    single.wait(a, all_healthy(cap), "Healthy")
    single.wait(b, all_healthy(cap), "Healthy")
    good = f"{a}Mvp0"
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    cases: list[tuple[str, list[list[str]], grpc.StatusCode]] = [
        ("an unknown ID", [["nopeMvp0"]], missing),
        ("an ID past the capacity", [[f"{a}Mvp{cap}"]], missing),
        ("a good ID and an unknown one", [[good, "nopeMvp0"]], missing),
        ("another resource's ID", [[f"{b}Mvp0"]], missing),
        ("a good ID and another resource's", [[good], [f"{b}Mvp1"]], missing),
        ("no container requests", [], invalid),
        ("a container request without IDs", [[]], invalid),
        ("a good container request and an empty one", [[good], []], invalid),
        ("an ID twice", [[good, good]], invalid),
        ("an ID in two containers", [[good], [good]], invalid),
        ("1000 IDs", [[f"{a}Mvp{i}" for i in range(1000)]], invalid),
        # over the 1 MiB the server takes: refused by gRPC itself, one clear status
        (f"{HUGE} IDs", [[f"{a}Mvp{i}" for i in range(HUGE)]], exhausted),
        (f"{HUGE} times a good ID", [[good] * HUGE], invalid),  # 0.9 MB: still taken
        (f"{HUGE} containers", [[good]] * HUGE, exhausted),
        ("a 2 MB ID", [["x" * (2 << 20)]], exhausted),
    ]
    wrong = []
    for what, requests, code in cases:
        try:
            single.kubelet.call_allocate(resource(a), requests, timeout=30)
        except grpc.RpcError as err:
            assert isinstance(err, grpc.Call)
            if err.code() != code:
                wrong.append(f"{what}: {err.code()} {err.details()!r}, expected {code}")
            elif len(err.details() or "") > 1000:
                wrong.append(f"{what}: a {len(err.details() or '')}-character message")
        else:
            wrong.append(f"{what}: accepted")
        if single.ns.macvtaps():
            wrong.append(f"{what}: made {[m['ifname'] for m in single.ns.macvtaps()]}")
            break
    assert wrong == []
    for name in (a, b):  # the refusals broke nothing
        state = single.kubelet.state(resource(name))
        assert state.register_count == 1 and state.connected and state.allocatable == cap
    [container] = single.kubelet.allocate(resource(a), [good], timeout=10).container_responses
    [tap] = single.ns.macvtaps()
    assert container.devices[0].host_path == f"/dev/tap{tap['ifindex']}"
