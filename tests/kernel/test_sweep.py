"""The sweep of leaked macvtaps: a resource process (``python -m macvtapdp.plugin``) in its own
netns, asking the kubelet stand-in's PodResources server which devices its pods hold; and one
``Sweep`` in this process, round by round on a clock of its own, against the same kernel."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from harness.kubelet import RATE_LIMITED, FakeKubelet, ResourceState
from harness.netns import NetNS
from harness.processes import Proc, resource, rmtree, serve_argv, short_tempdir, until
from macvtapdp import statefile
from macvtapdp.config import Mode, Resource
from macvtapdp.linux.link import Link
from macvtapdp.linux.netlink import Netlink
from macvtapdp.naming import interface_name
from macvtapdp.plugin.allocator import Allocator, Records
from macvtapdp.plugin.macvtap import Macvtaps
from macvtapdp.plugin.podresources import PodResources
from macvtapdp.plugin.sweep import Sweep
from macvtapdp.rundir import Layout
from macvtapdp.statefile import StateFile

pytestmark = pytest.mark.kernel

NAME, OTHER = "sw0", "sw1"  # resource names, and their lower links
RESOURCE = resource(NAME)
CAPACITY = 4
IDS = [f"{NAME}Mvp{i}" for i in range(CAPACITY)]
GRACE = 1.0  # seconds; rounds then come every second
WAIT = 15.0  # generous: a few rounds on a loaded machine


@dataclass
class Rig:
    ns: NetNS
    dir: str
    kubelet: FakeKubelet
    procs: list[Proc] = field(default_factory=list)

    @property
    def plugin_dir(self) -> str:
        return os.path.join(self.dir, "dp")

    @property
    def pod_resources_socket(self) -> str:
        assert self.kubelet.pod_resources_socket is not None
        return self.kubelet.pod_resources_socket

    def serve(self, name: str = NAME, grace: float = GRACE) -> Proc:
        proc = Proc(
            self.ns,
            serve_argv(
                name,
                self.plugin_dir,
                f"--lower={name}",
                f"--capacity={CAPACITY}",
                f"--run-dir={self.dir}/run",
                f"--sweep-grace={grace:g}",
                f"--pod-resources-socket={self.pod_resources_socket}",
            ),
        )
        self.procs.append(proc)
        assert self.kubelet.wait_for(resource(name), healthy, WAIT), self.kubelet.state(
            resource(name)
        )
        return proc

    def macvtap(self, dev_id: str) -> dict[str, object] | None:
        return self.ns.link(interface_name(dev_id))

    def allocate(self, dev_id: str, name: str = NAME) -> str:
        """An Allocate with no pod behind it (the kubelet's pod went before it was listed)."""
        answer = self.kubelet.allocate(resource(name), [dev_id], timeout=10)
        return answer.container_responses[0].devices[0].host_path

    def sweep_state(self, name: str = NAME) -> object:
        return statefile.read(Layout(f"{self.dir}/run").state_file(name)).get("sweep")

    def lists(self, ok: bool = True) -> int:
        return sum(
            1
            for c in self.kubelet.pod_resources_calls
            if c.method == "List" and (c.code == grpc.StatusCode.OK) is ok
        )

    def rounds(self, n: int, ok: bool = True) -> None:
        """Wait for ``n`` more List calls (answered OK, or failed)."""
        start = self.lists(ok)
        assert until(lambda: self.lists(ok) >= start + n, WAIT), self.kubelet.pod_resources_calls

    def gone(self, dev_id: str) -> bool:
        return until(lambda: self.macvtap(dev_id) is None, WAIT)


def healthy(s: ResourceState) -> bool:
    return s.connected and s.capacity == CAPACITY == s.allocatable


def swept_lines(proc: Proc, expect: int | None = None) -> list[str]:
    """The process's "swept" log lines; with ``expect``, once that many came (logs lag)."""

    def lines() -> list[str]:
        return [line for line in proc.output.lines if " swept " in line]

    if expect:
        until(lambda: len(lines()) >= expect, WAIT)
    return lines()


@pytest.fixture
def rig(netns: NetNS) -> Iterator[Rig]:
    netns.veth(NAME)
    netns.veth(OTHER)
    tmp = short_tempdir()
    kubelet = FakeKubelet(
        os.path.join(tmp, "dp"), pod_resources_socket=os.path.join(tmp, "pr", "kubelet.sock")
    )
    r = Rig(netns, tmp, kubelet)
    try:
        yield r
    finally:
        codes = [p.terminate() for p in r.procs]
        kubelet.stop()
        rmtree(tmp)
        for p in r.procs:
            assert "Traceback" not in p.output.text(), p.output.text()
        assert all(c == 0 for c in codes), codes


def test_a_listed_pod_keeps_its_macvtap_and_one_gone_loses_it(rig: Rig) -> None:
    rig.kubelet.start()
    proc = rig.serve()
    rig.kubelet.admit("vm1", "compute", RESOURCE, [IDS[0]])
    rig.kubelet.admit("vm2", "compute", RESOURCE, [IDS[1]])
    assert rig.macvtap(IDS[0]) and rig.macvtap(IDS[1])
    rig.rounds(2)
    rig.kubelet.remove_pod("vm2")
    assert rig.gone(IDS[1])
    # vm1's device was unheld no shorter than vm2's, had the sweep ignored what pods hold
    assert rig.macvtap(IDS[0]) is not None
    rig.rounds(3)
    assert rig.macvtap(IDS[0]) is not None
    [line] = swept_lines(proc, 1)
    assert re.search(rf"\[{NAME}\] swept {IDS[1]} \({interface_name(IDS[1])}, /dev/tap\d+\)", line)
    assert rig.sweep_state() == "active"
    assert proc.output.wait_for(rf"\[{NAME}\] sweep active")
    assert not [line for line in proc.output.lines if "was deleted" in line]  # one line only


@pytest.mark.parametrize(
    ("code", "details", "why"),
    [
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            RATE_LIMITED,
            f'the kubelet answered List with RESOURCE_EXHAUSTED: "{RATE_LIMITED}"',
        ),
        (grpc.StatusCode.INTERNAL, "boom", 'the kubelet answered List with INTERNAL: "boom"'),
    ],
)
def test_an_error_answer_deletes_nothing(
    rig: Rig, code: grpc.StatusCode, details: str, why: str
) -> None:
    rig.kubelet.start()
    rig.kubelet.pod_resources_fail(code, details)
    proc = rig.serve()
    rig.allocate(IDS[0])  # held by no pod at all
    rig.rounds(4, ok=False)  # more than three graces of nothing but errors
    assert rig.macvtap(IDS[0]) is not None
    assert rig.sweep_state() == f"paused: {why}"
    paused = [line for line in proc.output.lines if "sweep paused" in line]
    assert len(paused) == 1 and why in paused[0], paused  # once per transition
    rig.kubelet.pod_resources_fail(None)
    assert rig.gone(IDS[0])
    assert rig.sweep_state() == "active"
    assert len(swept_lines(proc, 1)) == 1


@pytest.mark.parametrize("dead_socket", [False, True], ids=["no-socket", "dead-socket"])
def test_an_unreachable_api_deletes_nothing(rig: Rig, dead_socket: bool) -> None:
    rig.kubelet.start()
    rig.kubelet.stop_pod_resources(leave_socket=dead_socket)
    proc = rig.serve()
    rig.allocate(IDS[0])
    why = "does not answer" if dead_socket else f"no socket at {rig.pod_resources_socket}"
    assert proc.output.wait_for(rf"\[{NAME}\] sweep paused: .*{re.escape(why)}", WAIT)
    time.sleep(4 * GRACE)  # rounds keep failing meanwhile (no server to count them)
    assert rig.macvtap(IDS[0]) is not None
    state = rig.sweep_state()
    assert isinstance(state, str) and state.startswith("paused: ") and why in state
    rig.kubelet.start_pod_resources()  # the kubelet is back
    assert rig.gone(IDS[0])
    assert rig.sweep_state() == "active"


def test_another_resources_and_strangers_interfaces_stay(rig: Rig) -> None:
    ns = rig.ns
    rig.kubelet.start()
    proc = rig.serve()
    other = rig.serve(OTHER, grace=0)  # its own sweep off
    others_dev = f"{OTHER}Mvp0"
    rig.allocate(others_dev, OTHER)  # another resource's macvtap, held by no pod
    strangers = {
        "stranger0": ("macvtap", NAME),  # not a device's name
        interface_name("zz0Mvp0"): ("macvtap", NAME),  # another resource's name, our lower
        interface_name(IDS[2]): ("macvlan", NAME),  # our device's name, not a macvtap
        interface_name(IDS[3]): ("macvtap", OTHER),  # our device's name, another lower
    }
    for ifname, (kind, lower) in strangers.items():
        ns.ip("link", "add", "link", lower, "name", ifname, "type", kind, "mode", "bridge")
    # Ours all the same: its name, a macvtap on our lower (another mode: from before a change)
    ns.ip("link", "add", "link", NAME, "name", interface_name(IDS[1]), "type", "macvtap")
    rig.allocate(IDS[0])
    assert rig.gone(IDS[0]) and rig.gone(IDS[1])
    rig.rounds(3)
    for ifname in strangers:
        assert ns.link(ifname) is not None, f"{ifname} was deleted"
    assert rig.macvtap(others_dev) is not None
    assert len(swept_lines(proc, 2)) == 2 and swept_lines(other) == []
    assert rig.sweep_state(OTHER) == "off"
    assert other.output.wait_for(rf"\[{OTHER}\] sweep off")


def test_allocate_after_a_sweep_makes_a_new_macvtap(rig: Rig) -> None:
    rig.kubelet.start()
    rig.serve()
    rig.allocate(IDS[0])
    assert rig.gone(IDS[0])
    rig.kubelet.admit("vm", "compute", RESOURCE, [IDS[0]])
    made = rig.macvtap(IDS[0])
    assert made is not None and made["linkinfo"]["info_kind"] == "macvtap"  # type: ignore[index]
    started = rig.kubelet.start_container("vm", "compute")  # PreStartContainer checks the tap
    [device] = started.devices
    assert device.type == "c" and device.host_path == f"/dev/tap{made['ifindex']}"
    rig.rounds(3)
    assert rig.macvtap(IDS[0]) is not None  # its pod is listed now


# -- one Sweep in this process, on a clock of its own -----------------------------------------


class Recorder:
    """An Observer that counts what the sweep reports."""

    def __init__(self) -> None:
        self.swept_count = 0

    def allocated(self, result: str, seconds: float, count: int = 1) -> None:
        pass

    def registered(self) -> None:
        pass

    def health(self, healthy: bool, capacity: int, lower_up: bool) -> None:
        pass

    def swept(self, count: int = 1) -> None:
        self.swept_count += count


class Lower:
    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink

    def current(self) -> Link | None:
        return self.netlink.link(name=NAME)

    def refresh(self) -> Link | None:
        return self.current()


@dataclass
class Local:
    kubelet: FakeKubelet
    allocator: Allocator
    sweep: Sweep
    observer: Recorder
    skew: list[float]  # seconds the sweep's clock is ahead of time.monotonic()
    clock: Callable[[], float]  # the sweep's and the allocator's

    def after(self, seconds: float) -> None:
        self.skew[0] += seconds


@pytest.fixture
def local(netns: NetNS) -> Iterator[Local]:
    netns.veth(NAME)
    tmp = short_tempdir()
    kubelet = FakeKubelet(
        os.path.join(tmp, "dp"), pod_resources_socket=os.path.join(tmp, "pr", "kubelet.sock")
    )
    stack = contextlib.ExitStack()
    try:
        sysfs = stack.enter_context(netns.sysfs())
        stack.enter_context(netns.entered())
        netlink = Netlink()
        stack.callback(netlink.close)
        stack.enter_context(kubelet)
        res = Resource(NAME, NAME, Mode.BRIDGE, CAPACITY)
        skew = [0.0]
        clock: Callable[[], float] = lambda: time.monotonic() + skew[0]  # noqa: E731
        allocator = Allocator(
            res, Macvtaps(netlink, sysfs=sysfs), Lower(netlink), Records(None), clock=clock
        )
        observer = Recorder()
        assert kubelet.pod_resources_socket is not None
        sweep = Sweep(
            res, allocator, PodResources(kubelet.pod_resources_socket), StateFile(None), observer,
            grace=300.0, clock=clock,
        )  # fmt: skip
        yield Local(kubelet, allocator, sweep, observer, skew, clock)
    finally:
        stack.close()
        rmtree(tmp)


def test_rounds_delete_after_the_grace_and_report_each(local: Local, netns: NetNS) -> None:
    for dev_id in IDS[:3]:
        local.allocator.allocate([dev_id])
    local.kubelet.add_pod("vm", "default", {"compute": {RESOURCE: [IDS[0]]}})
    assert local.sweep.run_once() == 0 and local.sweep.status == "active"
    local.after(299.0)
    assert local.sweep.run_once() == 0
    local.after(1.0)
    assert local.sweep.run_once() == 2
    assert local.observer.swept_count == 2
    assert [m["ifname"] for m in netns.macvtaps()] == [interface_name(IDS[0])]
    local.after(1000.0)
    assert local.sweep.run_once() == 0 and local.observer.swept_count == 2


def test_an_allocate_resets_the_clock_of_a_leaked_macvtap(local: Local, netns: NetNS) -> None:
    """The kubelet hands a leaked device to a new pod: Allocate reuses the macvtap, and the
    pod is listed only after that; the macvtap must survive the rounds in between."""
    local.allocator.allocate([IDS[0]])
    assert local.sweep.run_once() == 0
    local.after(299.0)
    [again] = local.allocator.allocate([IDS[0]])  # the clock's 300 s would end now
    assert not again.created
    local.after(1.0)
    assert local.sweep.run_once() == 0
    assert [m["ifname"] for m in netns.macvtaps()] == [interface_name(IDS[0])]
    local.after(299.0)
    assert local.sweep.run_once() == 1  # still no pod lists it: a whole grace from its use


def test_a_pause_starts_every_clock_again(local: Local, netns: NetNS) -> None:
    local.allocator.allocate([IDS[0]])
    assert local.sweep.run_once() == 0
    local.after(200.0)
    local.kubelet.stop_pod_resources()  # a kubelet restart
    assert local.sweep.run_once() == 0
    assert local.sweep.status.startswith("paused: no socket at ")
    local.kubelet.start_pod_resources()
    local.after(100.0)
    assert local.sweep.run_once() == 0 and local.sweep.status == "active"
    local.after(299.0)
    assert local.sweep.run_once() == 0
    local.after(1.0)
    assert local.sweep.run_once() == 1
    assert netns.macvtaps() == []


def test_the_sweep_deletes_nothing_used_after_its_list(local: Local, netns: NetNS) -> None:
    """``Allocator.sweep`` refuses a device allocated after the List the round acted on."""
    local.allocator.allocate([IDS[0]])
    ifname = interface_name(IDS[0])
    link = local.allocator.macvtaps.netlink.link(name=ifname)
    assert link is not None and local.allocator.is_own(link) == IDS[0]
    listed_at = local.clock()
    local.allocator.allocate([IDS[0]])
    assert not local.allocator.sweep(link, IDS[0], not_used_since=listed_at)
    assert netns.link(ifname) is not None
    local.after(0.001)
    assert local.allocator.sweep(link, IDS[0], not_used_since=local.clock())
    assert netns.link(ifname) is None
    assert not local.allocator.sweep(link, IDS[0])  # already gone


def test_netlink_lists_the_macvtaps_of_its_namespace_only(netns: NetNS) -> None:
    """The kernel-filtered dump the sweep uses: macvtaps only, fully described."""
    netns.veth(NAME)
    for i in range(3):
        netns.veth(f"pv{i}")  # a node's pod veths
    netns.ip("link", "add", "link", NAME, "name", "mvl0", "type", "macvlan", "mode", "bridge")
    netns.ip("link", "add", "link", NAME, "name", "mtap0", "type", "macvtap", "mode", "vepa")
    netns.ip("link", "add", "link", "pv0", "name", "mtap1", "type", "macvtap", "mode", "bridge")
    with netns.entered():
        netlink = Netlink()
    try:
        found = {link.name: link for link in netlink.macvtaps()}
        lower, pv0 = netlink.link(name=NAME), netlink.link(name="pv0")
    finally:
        netlink.close()
    assert sorted(found) == ["mtap0", "mtap1"]
    assert lower is not None and pv0 is not None
    assert found["mtap0"].lower_index == lower.index and found["mtap0"].macvlan_mode == "vepa"
    assert found["mtap1"].lower_index == pv0.index and found["mtap1"].macvlan_mode == "bridge"
    assert all(link.kind == "macvtap" and link.link_netnsid is None for link in found.values())


def test_stop_ends_a_round_waiting_on_a_hung_kubelet(local: Local) -> None:
    """SIGTERM must not wait for a List that a hung kubelet never answers (60 s here)."""
    path = os.path.join(short_tempdir(), "hung.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
            hung.bind(path)
            hung.listen(8)
            res = local.allocator.resource
            sweep = Sweep(
                res, local.allocator, PodResources(path, timeout=60.0), StateFile(None),
                local.observer, grace=1.0,
            )  # fmt: skip
            sweep.start()
            hung.settimeout(WAIT)
            conn, _ = hung.accept()  # the round's List is under way
            with conn:
                sweep.stop()
                assert not sweep.running
                assert sweep.status == "starting"  # stopping is no failure to report
    finally:
        rmtree(os.path.dirname(path))
