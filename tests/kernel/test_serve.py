"""A resource process (``python -m macvtapdp.plugin``) in its own netns, driven by the
kubelet stand-in, on a machine whose /dev holds other namespaces' and stale taps."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from harness import frames
from harness.kubelet import ContainerStartError, FakeKubelet, ResourceState, StartedDevice
from harness.netns import NetNS
from harness.processes import RESOURCE_DOMAIN, Proc, rmtree, serve_argv, short_tempdir, until
from macvtapdp.naming import interface_name

pytestmark = pytest.mark.kernel

NAME = "lw0"
RESOURCE = f"{RESOURCE_DOMAIN}/{NAME}"
CAPACITY = 4
IDS = [f"{NAME}Mvp{i}" for i in range(CAPACITY)]


@dataclass
class Setup:
    ns: NetNS
    plugin_dir: str
    kubelet: FakeKubelet
    procs: list[Proc] = field(default_factory=list)

    def serve(self, *options: str, name: str = NAME) -> Proc:
        opts = options or (f"--lower={NAME}", f"--capacity={CAPACITY}")
        proc = Proc(self.ns, serve_argv(name, self.plugin_dir, *opts))
        self.procs.append(proc)
        return proc

    def wait(self, check: object, timeout: float = 10.0) -> ResourceState:
        assert callable(check)
        ok = self.kubelet.wait_for(RESOURCE, check, timeout)
        state = self.kubelet.state(RESOURCE)
        assert ok, f"kubelet state never matched: {state}"
        return state

    def all_healthy(self) -> ResourceState:
        return self.wait(lambda s: s.connected and s.allocatable == CAPACITY == s.capacity)

    def all_unhealthy(self) -> ResourceState:
        return self.wait(lambda s: s.connected and s.capacity == CAPACITY and s.allocatable == 0)

    def tap_path(self, dev_id: str) -> str:
        [container] = self.kubelet.allocate(RESOURCE, [dev_id], timeout=10).container_responses
        [spec] = container.devices
        assert spec.host_path == spec.container_path and spec.permissions == "rw"
        return spec.host_path

    def own_sockets(self) -> list[str]:
        return [f for f in os.listdir(self.plugin_dir) if f.startswith(f"{RESOURCE_DOMAIN}_")]


@pytest.fixture
def setup(netns: NetNS) -> Iterator[Setup]:
    netns.veth(NAME)
    plugin_dir = short_tempdir()
    kubelet = FakeKubelet(plugin_dir)
    s = Setup(netns, plugin_dir, kubelet)
    try:
        yield s
    finally:
        codes = [p.terminate() for p in s.procs]
        kubelet.stop()
        rmtree(plugin_dir)
        for p in s.procs:
            assert "Traceback" not in p.output.text(), p.output.text()
        assert all(c == 0 for c in codes), codes


def test_registers_and_offers_every_device_healthy(setup: Setup) -> None:
    setup.kubelet.start()
    proc = setup.serve()
    state = setup.all_healthy()
    assert sorted(state.devices) == sorted(IDS)
    [reg] = [r for r in setup.kubelet.registrations if r.error is None]
    assert reg.version == "v1beta1" and reg.resource_name == RESOURCE
    assert reg.endpoint.startswith(f"{RESOURCE_DOMAIN}_{NAME}@") and reg.endpoint.endswith(".sock")
    assert state.options is not None and state.options.pre_start_required
    assert proc.output.wait_for(rf"\[{NAME}\] registered {RESOURCE}")


def test_allocated_tap_passes_frames_both_ways(setup: Setup) -> None:
    setup.ns.ip("link", "set", NAME, "txqueuelen", "777")
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    path = setup.tap_path(IDS[2])
    [tap] = setup.ns.macvtaps()
    assert path == f"/dev/tap{tap['ifindex']}"
    assert tap["linkinfo"]["info_data"]["mode"] == "bridge" and tap["link"] == NAME
    assert tap["txqlen"] == 777 and "UP" in tap["flags"]
    peer_mac = setup.ns.link(f"{NAME}p")["address"]  # type: ignore[index]
    fd = frames.open_tap(path)
    try:
        with setup.ns.entered():
            peer = frames.packet_socket(f"{NAME}p")
        with peer:
            inbound = secrets.token_bytes(8)
            peer.send(frames.frame(tap["address"], peer_mac, inbound))
            assert frames.read_tap(fd, inbound)[:6] == frames.mac_bytes(tap["address"])
            outbound = secrets.token_bytes(8)
            frames.write_tap(fd, frames.frame(peer_mac, tap["address"], outbound))
            assert frames.recv_packet(peer, outbound)[6:12] == frames.mac_bytes(tap["address"])
    finally:
        os.close(fd)


def test_allocating_again_returns_the_same_tap(setup: Setup) -> None:
    """The kubelet allocates an init container's devices again for the app container."""
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    first = setup.tap_path(IDS[0])
    again = setup.tap_path(IDS[0])
    assert first == again
    assert len(setup.ns.macvtaps()) == 1


def test_anything_else_with_the_name_is_replaced(setup: Setup) -> None:
    squatter = interface_name(IDS[1])
    setup.ns.ip("link", "add", squatter, "type", "veth", "peer", "name", "sq0")
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    path = setup.tap_path(IDS[1])
    shown = setup.ns.link(squatter)
    assert shown is not None and shown["linkinfo"]["info_kind"] == "macvtap"
    assert path == f"/dev/tap{shown['ifindex']}"


def test_unknown_device_is_refused_and_nothing_is_made(setup: Setup) -> None:
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    for bad in (["eth9Mvp0"], [IDS[0], f"{NAME}Mvp{CAPACITY}"]):
        with pytest.raises(grpc.RpcError) as caught:
            setup.kubelet.allocate(RESOURCE, bad, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert setup.ns.macvtaps() == []


def test_health_follows_the_lower_link(setup: Setup) -> None:
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    setup.ns.ip("link", "set", NAME, "down")
    setup.all_unhealthy()
    setup.ns.ip("link", "set", NAME, "up")
    setup.all_healthy()
    setup.ns.ip("link", "set", f"{NAME}p", "down")  # carrier lost
    setup.all_unhealthy()
    setup.ns.ip("link", "set", f"{NAME}p", "up")
    setup.all_healthy()
    index = setup.ns.link(NAME)["ifindex"]  # type: ignore[index]
    setup.ns.ip("link", "del", NAME)
    setup.all_unhealthy()
    setup.ns.veth(NAME)
    assert setup.ns.link(NAME)["ifindex"] != index  # type: ignore[index]
    setup.all_healthy()
    assert setup.tap_path(IDS[0]).startswith("/dev/tap")


def test_missing_lower_link_offers_all_devices_unhealthy(setup: Setup) -> None:
    setup.ns.ip("link", "del", NAME)
    setup.kubelet.start()
    setup.serve()
    setup.all_unhealthy()
    with pytest.raises(grpc.RpcError) as caught:
        setup.kubelet.allocate(RESOURCE, [IDS[0]], timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    setup.ns.veth(NAME)
    setup.all_healthy()


def test_waits_for_a_kubelet_that_is_not_there_yet(setup: Setup) -> None:
    proc = setup.serve()
    assert proc.output.wait_for("waiting for the kubelet")
    time.sleep(0.5)
    setup.kubelet.start()
    setup.all_healthy()


def test_registers_again_after_a_kubelet_restart(setup: Setup) -> None:
    setup.kubelet.start()
    proc = setup.serve()
    setup.all_healthy()
    for round_ in range(3):
        before = setup.kubelet.state(RESOURCE).endpoint
        setup.kubelet.restart()
        state = setup.all_healthy()
        assert state.endpoint != before, f"round {round_}: same socket name reused"
        assert setup.own_sockets() == [state.endpoint]
    assert proc.output.wait_for("kubelet restart seen")


def test_stale_sockets_of_the_resource_are_removed(setup: Setup) -> None:
    setup.kubelet.start()
    stale = [f"{RESOURCE_DOMAIN}_{NAME}", f"{RESOURCE_DOMAIN}_{NAME}@abcdef.sock"]
    other = f"{RESOURCE_DOMAIN}_{NAME}x@abcdef.sock"  # another resource's: kept
    for name in [*stale, other]:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.join(setup.plugin_dir, name))
    setup.serve()
    state = setup.all_healthy()
    assert sorted(setup.own_sockets()) == sorted([str(state.endpoint), other])


def test_sigterm_ends_the_stream_and_removes_the_socket(setup: Setup) -> None:
    setup.kubelet.start()
    proc = setup.serve()
    setup.all_healthy()
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 5.0  # "within seconds"; the benchmark measures it
    assert setup.own_sockets() == []
    setup.wait(lambda s: not s.connected and s.allocatable == 0 and s.capacity == CAPACITY)


def test_passthru_takes_the_whole_link(setup: Setup) -> None:
    setup.kubelet.start()
    setup.serve(f"--lower={NAME}", "--mode=passthru", "--capacity=1")
    assert setup.wait(lambda s: s.connected and s.allocatable == 1 == s.capacity)
    path = setup.tap_path(f"{NAME}Mvp0")
    [tap] = setup.ns.macvtaps()
    assert tap["linkinfo"]["info_data"]["mode"] == "passthru"
    assert path == f"/dev/tap{tap['ifindex']}"


def test_bad_options_exit_2_with_one_line(setup: Setup) -> None:
    proc = Proc(setup.ns, serve_argv("a b", setup.plugin_dir, "--lower=x y", "--capacity=0"))
    assert proc.wait(10) == 2
    assert proc.output.lines == [
        'macvtapdp: error: settings.name: "a b" is not a valid resource name: use letters, '
        'digits, "-", "_" or ".", starting and ending with a letter or digit',
        'macvtapdp: error: settings.master: "x y" is not a valid interface name (1-15 printable '
        'ASCII characters, not "." or "..", no "/", ":" or whitespace)',
        "macvtapdp: error: settings.capacity: 0 is out of range; must be between 1 and 1000",
    ]


def test_a_name_too_long_for_the_plugin_dir_fails_in_one_line(setup: Setup) -> None:
    deep = os.path.join(setup.plugin_dir, "d" * 60)
    os.makedirs(deep)
    proc = Proc(setup.ns, serve_argv("a" * 30, deep, f"--lower={NAME}"))
    assert proc.wait(10) == 2
    [line] = proc.output.lines
    assert line.startswith("macvtapdp: error: resource name") and "too long" in line


# -- what a container gets at every start ----------------------------------------------------


def start(setup: Setup, pod: str = "vm") -> StartedDevice:
    """The container's one device, as the runtime resolves it at this start."""
    started = setup.kubelet.start_container(pod, "compute")
    [device] = started.devices
    return device


def admitted(setup: Setup, dev: str = IDS[0], pod: str = "vm") -> str:
    response = setup.kubelet.admit(pod, "compute", RESOURCE, [dev])
    [spec] = response.devices
    return spec.host_path


def own_rdev(ns: NetNS, dev: str) -> tuple[int, int]:
    """major:minor of ``dev``'s macvtap, read from sysfs inside the namespace."""
    ifname = interface_name(dev)
    return sysfs_tap(ns, ifname, ns.link(ifname)["ifindex"])  # type: ignore[index]


def sysfs_tap(ns: NetNS, ifname: str, index: int) -> tuple[int, int]:
    """major:minor of macvtap ``ifname``'s tap, from sysfs as mounted inside ``ns``."""
    done = subprocess.run(
        ns.argv(["cat", f"/sys/class/net/{ifname}/tap{index}/dev"]),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    major, minor = done.stdout.strip().split(":")
    return int(major), int(minor)


def test_every_container_start_gets_the_devices_own_tap(setup: Setup) -> None:
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    path = admitted(setup)
    for _ in range(3):  # the first start and two restarts, no Allocate in between
        device = start(setup)
        assert device.host_path == device.container_path == path
        assert (device.major, device.minor) == own_rdev(setup.ns, IDS[0])
    starts = setup.kubelet.starts
    assert [s.pre_started for s in starts] == [(RESOURCE,)] * 3


def test_a_restart_never_gets_another_namespaces_macvtap_at_the_same_path(
    setup: Setup,
) -> None:
    """Our macvtap is gone; another namespace made one at the very /dev/tapN we gave."""
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    path = admitted(setup)
    start(setup)
    index = path.removeprefix("/dev/tap")
    setup.ns.ip("link", "del", interface_name(IDS[0]))
    other = NetNS()
    try:
        other.veth("ol0")
        other.ip("link", "add", "link", "ol0", "name", "theirs", "index", index, "type", "macvtap")
        assert os.path.exists(path)  # theirs now
        with pytest.raises(ContainerStartError, match="another device's"):
            start(setup)
        assert os.path.exists(path) and other.link("theirs") is not None  # never touched
    finally:
        other.close()


def test_a_restart_after_the_macvtap_was_lost_makes_it_again_at_the_same_path(
    setup: Setup,
) -> None:
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    path = admitted(setup)
    start(setup)
    setup.ns.ip("link", "del", interface_name(IDS[0]))
    assert not os.path.exists(path)
    device = start(setup)
    assert device.host_path == path
    assert (device.major, device.minor) == own_rdev(setup.ns, IDS[0])


def test_a_macvtap_moved_into_the_pod_keeps_its_path(setup: Setup) -> None:
    """What the macvtap CNI does: look the link up, move it into the pod, rename it."""
    setup.kubelet.start()
    setup.serve()
    setup.all_healthy()
    path = admitted(setup)
    pod = NetNS()
    try:
        # the altname follows the Allocate's answer by a request; the CNI comes much later
        assert until(lambda: setup.ns.link(IDS[0]) is not None, 5.0)
        # both CNI schemes find it: released ones by the device ID, main by the mvt name
        by_id, by_name = setup.ns.link(IDS[0]), setup.ns.link(interface_name(IDS[0]))
        assert by_id is not None and by_name is not None
        assert by_id["ifindex"] == by_name["ifindex"] == int(path.removeprefix("/dev/tap"))
        setup.ns.ip("link", "set", IDS[0], "netns", pod.name)  # by the altname, as CNI v0.13
        pod.ip("link", "set", interface_name(IDS[0]), "name", "net1")
        pod.ip("link", "set", "net1", "up")
        device = start(setup)
        assert device.host_path == path and os.path.exists(path)
        index = int(path.removeprefix("/dev/tap"))
        assert pod.link("net1")["ifindex"] == index  # type: ignore[index]
        assert pod.link("net1")["altnames"] == [IDS[0]]  # type: ignore[index]
        # the node at the path is the moved macvtap's own, as the pod's own sysfs reports it
        major, minor = sysfs_tap(pod, "net1", index)
        node = os.stat(path)
        assert stat.S_ISCHR(node.st_mode) and node.st_rdev == os.makedev(major, minor)
        assert (device.major, device.minor) == (major, minor)
        # and frames pass through it both ways: it still sits on the lower link, whose
        # peer stayed in the plugin's namespace
        net1_mac = str(pod.link("net1")["address"])  # type: ignore[index]
        peer_mac = str(setup.ns.link(f"{NAME}p")["address"])  # type: ignore[index]
        with setup.ns.entered():
            peer = frames.packet_socket(f"{NAME}p")
        with peer:
            frames.assert_both_ways(path, net1_mac, peer, peer_mac)
    finally:
        pod.close()


def test_a_passthru_device_still_in_a_pod_is_refused_naming_it(setup: Setup) -> None:
    """The CNI moved the passthru macvtap into the pod, where it still holds the lower link:
    allocating the device again is refused, naming it, and makes nothing."""
    dev = f"{NAME}Mvp0"
    setup.kubelet.start()
    setup.serve(f"--lower={NAME}", "--mode=passthru", "--capacity=1")
    assert setup.wait(lambda s: s.connected and s.allocatable == 1 == s.capacity)
    path = setup.tap_path(dev)
    pod = NetNS()
    try:
        setup.ns.ip("link", "set", interface_name(dev), "netns", pod.name)
        pod.ip("link", "set", interface_name(dev), "name", "net1")
        pod.ip("link", "set", "net1", "up")
        moved = pod.link("net1")
        assert moved is not None and moved["linkinfo"]["info_data"]["mode"] == "passthru"
        assert setup.ns.macvtaps() == []
        before = sorted((link["ifindex"], link["ifname"]) for link in setup.ns.links())
        with pytest.raises(grpc.RpcError) as caught:
            setup.kubelet.allocate(RESOURCE, [dev], timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == (
            f"lower link {NAME} is held by a passthru macvtap in another network namespace: "
            f"{dev}'s own, still in a pod (the macvtap CNI moved it there), or another plugin's"
        )
        assert sorted((link["ifindex"], link["ifname"]) for link in setup.ns.links()) == before
        assert setup.ns.macvtaps() == []
        assert os.path.exists(path) and pod.link("net1") is not None  # the pod's, untouched
    finally:
        pod.close()


def test_a_restart_never_gets_a_node_made_since_at_the_path_of_a_macvtap_in_the_pod(
    setup: Setup,
) -> None:
    """The CNI moved the macvtap into the pod, where it was deleted; another namespace has
    made one at the same /dev/tapN since (with the lowest free minor: likely the same)."""
    setup.kubelet.start()
    proc = setup.serve()
    setup.all_healthy()
    path = admitted(setup)
    index = path.removeprefix("/dev/tap")
    pod = NetNS()
    try:
        setup.ns.ip("link", "set", interface_name(IDS[0]), "netns", pod.name)
        assert proc.output.wait_for("moved into another network namespace", 5.0)
        assert start(setup).host_path == path  # the moved macvtap's own node
        pod.ip("link", "del", interface_name(IDS[0]))  # the CNI's DEL, or the pod gone
        assert until(lambda: not os.path.exists(path), 5.0)
        other = NetNS()
        try:
            other.veth("ol0")
            other.ip(
                "link", "add", "link", "ol0", "name", "theirs", "index", index, "type", "macvtap"
            )
            assert os.path.exists(path)  # theirs now
            with pytest.raises(ContainerStartError, match="made again since, for another device"):
                start(setup)
            assert other.link("theirs") is not None  # never touched
        finally:
            other.close()
    finally:
        pod.close()


def test_preferred_taps_differ_per_node_so_a_second_plugin_does_not_chase_ours(
    setup: Setup,
) -> None:
    """Two plugins with the same configuration on one kernel each get their own tap."""
    other = NetNS()
    other_dir = short_tempdir()
    other_kubelet = FakeKubelet(other_dir)
    other.veth(NAME)
    second = Proc(other, serve_argv(NAME, other_dir, f"--lower={NAME}", f"--capacity={CAPACITY}"))
    try:
        setup.kubelet.start()
        other_kubelet.start()
        setup.serve()
        setup.all_healthy()
        assert other_kubelet.wait_for(RESOURCE, lambda s: s.allocatable == CAPACITY, 10)
        ours = admitted(setup)
        [spec] = other_kubelet.admit("vm", "compute", RESOURCE, [IDS[0]]).devices
        assert spec.host_path != ours
        assert (start(setup).major, start(setup).minor) == own_rdev(setup.ns, IDS[0])
    finally:
        assert second.terminate() == 0
        other_kubelet.stop()
        rmtree(other_dir)
        other.close()


# -- NUMA topology ----------------------------------------------------------------------------


def test_a_veth_lower_link_has_no_topology(setup: Setup) -> None:
    """On CI's kernel the lower links are veths: no device, no NUMA node."""
    setup.kubelet.start()
    setup.serve()
    assert setup.all_healthy().topology == {}


def numa_tree(root: str, link: str, node: int) -> None:
    device = os.path.join(root, "devices", "pci0", link)
    os.makedirs(device, exist_ok=True)
    with open(os.path.join(device, "numa_node"), "w") as fh:
        fh.write(f"{node}\n")
    net = os.path.join(root, "class", "net", link)
    os.makedirs(net, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(net, "device"))
    os.symlink(device, os.path.join(net, "device"))


def test_devices_carry_the_lower_links_numa_node_and_follow_it(setup: Setup) -> None:
    root = os.path.join(setup.plugin_dir, "sys")
    numa_tree(root, NAME, 1)
    setup.kubelet.start()
    setup.serve(f"--lower={NAME}", f"--capacity={CAPACITY}", f"--numa-sysfs={root}")
    state = setup.wait(lambda s: s.allocatable == CAPACITY and len(s.topology) == CAPACITY)
    assert state.topology == dict.fromkeys(IDS, (1,))
    # the lower link made again, on a device of another node
    setup.ns.ip("link", "del", NAME)
    numa_tree(root, NAME, 0)
    setup.ns.veth(NAME)
    state = setup.wait(lambda s: s.allocatable == CAPACITY and set(s.topology.values()) == {(0,)})
    assert state.topology == dict.fromkeys(IDS, (0,))


def test_no_topology_turns_it_off(setup: Setup) -> None:
    root = os.path.join(setup.plugin_dir, "sys")
    numa_tree(root, NAME, 1)
    setup.kubelet.start()
    setup.serve(
        f"--lower={NAME}", f"--capacity={CAPACITY}", f"--numa-sysfs={root}", "--topology=false"
    )
    assert setup.all_healthy().topology == {}
