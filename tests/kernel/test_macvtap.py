"""A device's macvtap and its /dev/tapN, against the real kernel and the real /dev.

/dev is one devtmpfs for every namespace on the kernel, and the session's
``shared_machine`` fixture has planted stale nodes and another namespace's
macvtaps at the numbers these tests would pick first.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import frames
from harness.netns import NetNS
from macvtapdp import naming
from macvtapdp.config import Mode
from macvtapdp.errors import AllocationError, LinkMissingError, LowerLinkBusy
from macvtapdp.linux.bpf import HIGH_INDEX
from macvtapdp.linux.link import Link
from macvtapdp.linux.netlink import Netlink
from macvtapdp.plugin.macvtap import Macvtaps, Tap, candidates, sysfs_rdev

pytestmark = pytest.mark.kernel

DEV = "lw0Mvp0"
IFNAME = naming.interface_name(DEV)


@dataclass
class Side:
    """One namespace with a lower link, and the plugin's view of it."""

    ns: NetNS
    netlink: Netlink
    macvtaps: Macvtaps
    sysfs: str

    def lower(self, name: str = "lw0") -> Link:
        link = self.netlink.link(name=name)
        assert link is not None
        return link

    def ensure(
        self, dev: str = DEV, mode: Mode = Mode.BRIDGE, lower: str = "lw0"
    ) -> tuple[Tap, bool]:
        return self.macvtaps.ensure(dev, naming.interface_name(dev), self.lower(lower), mode)


@contextlib.contextmanager
def side(ns: NetNS, dev_dir: str = "/dev") -> Iterator[Side]:
    ns.veth("lw0")
    with ns.sysfs() as sysfs, ns.entered():
        netlink = Netlink()
        macvtaps = Macvtaps(netlink, dev_dir=dev_dir, sysfs=sysfs)
        try:
            yield Side(ns, netlink, macvtaps, sysfs)
        finally:
            macvtaps.close()
            netlink.close()


@pytest.fixture
def one(netns: NetNS) -> Iterator[Side]:
    with side(netns) as s:
        yield s


def shown(ns: NetNS, name: str) -> dict[str, object]:
    found = ns.link(name)
    assert found is not None, f"{name} does not exist"
    return found


def assert_own_tap(tap: Tap, s: Side, lower: str = "lw0", mode: Mode = Mode.BRIDGE) -> None:
    """``tap`` is an up macvtap on ``lower`` in ``mode`` whose /dev node is its own."""
    link = shown(s.ns, tap.ifname)
    assert link["linkinfo"]["info_kind"] == "macvtap"  # type: ignore[index]
    assert link["linkinfo"]["info_data"]["mode"] == mode.value  # type: ignore[index]
    assert link["link"] == lower and "UP" in link["flags"]  # type: ignore[operator]
    assert tap.index == link["ifindex"] and tap.path == f"/dev/tap{tap.index}"
    assert tap.index >= HIGH_INDEX
    node = os.stat(tap.path)
    assert stat.S_ISCHR(node.st_mode) and node.st_rdev == tap.rdev
    assert sysfs_rdev(tap.ifname, tap.index, s.sysfs) == tap.rdev


def test_creates_an_up_macvtap_at_a_free_high_index(one: Side) -> None:
    one.ns.ip("link", "set", "lw0", "txqueuelen", "1234")
    tap, created = one.ensure(mode=Mode.VEPA)
    assert created
    assert_own_tap(tap, one, mode=Mode.VEPA)
    one.macvtaps.flush()  # the altname follows the answer
    link = shown(one.ns, IFNAME)
    assert link["txqlen"] == 1234
    assert link["altnames"] == [DEV]  # what released macvtap CNIs look the device up by


def test_the_go_plugins_macvtap_of_the_device_gives_way_to_the_altname(one: Side) -> None:
    """Switched from the Go plugin: its macvtap of this device, named after the ID, is left.

    Allocated again, the device's own macvtap takes the ID as altname, so that released
    CNIs find it; the leftover on our lower link goes. Anything else of that name stays.
    """
    one.ns.ip("link", "add", "link", "lw0", "name", DEV, "type", "macvtap")
    tap, created = one.ensure()
    one.macvtaps.flush()
    assert created and shown(one.ns, IFNAME)["altnames"] == [DEV]
    assert one.netlink.link(name=DEV) == one.netlink.link(index=tap.index)

    other = "lw0Mvp1"
    one.ns.ip("link", "add", other, "type", "veth", "peer", "name", "peer0")  # not a macvtap
    one.ensure(other)
    one.macvtaps.flush()
    assert shown(one.ns, other)["ifname"] == other
    assert not shown(one.ns, naming.interface_name(other)).get("altnames")


def test_stale_and_foreign_nodes_are_skipped_never_touched(one: Side) -> None:
    """The first numbers of this device hold someone's node (the session planted them)."""
    first = candidates(DEV)[:3]
    before = {n: os.lstat(f"/dev/tap{n}").st_rdev for n in first if os.path.lexists(f"/dev/tap{n}")}
    assert before, "the shared_machine fixture planted nothing at this device's numbers"
    tap, _ = one.ensure()
    assert tap.index not in before
    assert {n: os.lstat(f"/dev/tap{n}").st_rdev for n in before} == before
    assert_own_tap(tap, one)


def test_two_namespaces_with_the_same_configuration_get_their_own_devices(
    netns: NetNS,
) -> None:
    """Two kind nodes on one host: the same device ID, each its own macvtap and node."""
    other = NetNS()
    try:
        with side(netns) as a:
            tap_a, _ = a.ensure("lower0Mvp3")
            with side(other) as b:
                tap_b, _ = b.ensure("lower0Mvp3")
                assert_own_tap(tap_b, b)
                assert_frames_pass(b, tap_b)  # frames written to it leave on its own link
            assert_own_tap(tap_a, a)
            assert_frames_pass(a, tap_a)
            assert tap_a.path != tap_b.path and tap_a.rdev != tap_b.rdev
    finally:
        other.close()


def assert_frames_pass(s: Side, tap: Tap) -> None:
    tap_mac = str(shown(s.ns, tap.ifname)["address"])
    with frames.packet_socket("lw0p") as peer:
        frames.assert_both_ways(tap.path, tap_mac, peer, str(shown(s.ns, "lw0p")["address"]))


def test_frames_pass_both_ways_through_dev_tap(one: Side) -> None:
    tap, _ = one.ensure()
    assert_frames_pass(one, tap)


def test_reuses_the_same_macvtap_and_brings_it_up(one: Side) -> None:
    first, created = one.ensure()
    again, created_again = one.ensure()
    one.ns.ip("link", "set", IFNAME, "down")
    one.ns.ip("link", "property", "del", "dev", IFNAME, "altname", DEV)
    once_more, _ = one.ensure()
    one.macvtaps.flush()
    assert created and not created_again
    assert first == again == once_more
    assert_own_tap(once_more, one)  # and up again
    assert shown(one.ns, IFNAME)["altnames"] == [DEV]  # and its altname back
    assert len(one.ns.macvtaps()) == 1


@pytest.mark.parametrize(
    "squatter",
    [
        ["link", "add", IFNAME, "link", "lw0", "type", "macvtap", "mode", "vepa"],
        ["link", "add", IFNAME, "link", "lw1", "type", "macvtap", "mode", "bridge"],
        ["link", "add", IFNAME, "type", "veth", "peer", "name", "sqp"],
        # the right macvtap, but at a low index whose /dev/tapN is a stale node
        ["link", "add", IFNAME, "index", "7", "link", "lw0", "type", "macvtap", "mode", "bridge"],
    ],
    ids=["wrong-mode", "other-lower", "veth", "foreign-node"],
)
def test_replaces_anything_else_of_that_name(one: Side, squatter: list[str]) -> None:
    one.ns.veth("lw1")
    one.ns.ip(*squatter)
    before = shown(one.ns, IFNAME)["ifindex"]
    tap, created = one.ensure()
    assert created and tap.index != before
    assert_own_tap(tap, one)
    assert [link["ifname"] for link in one.ns.macvtaps()] == [IFNAME]


def test_missing_lower_creates_nothing(one: Side) -> None:
    lower = one.lower()
    one.ns.ip("link", "del", "lw0")
    with pytest.raises(LinkMissingError, match="lw0"):
        one.macvtaps.ensure(DEV, IFNAME, lower, Mode.BRIDGE)
    assert one.ns.macvtaps() == []


def test_without_the_hosts_devtmpfs_it_fails_and_leaves_nothing(
    netns: NetNS, tmp_path: Path
) -> None:
    """No node ever appears in ``dev_dir``: fail, delete the macvtap, make no node."""
    with side(netns, dev_dir=str(tmp_path)) as s, pytest.raises(AllocationError, match=DEV):
        s.ensure()
    assert netns.macvtaps() == [] and list(tmp_path.iterdir()) == []


def test_the_kernel_owns_the_node_it_goes_with_the_macvtap(one: Side) -> None:
    tap, _ = one.ensure()
    assert os.path.exists(tap.path)
    assert one.macvtaps.remove(IFNAME)
    assert not os.path.lexists(tap.path)  # a node we had made with mknod would stay


def test_remove_deletes_only_macvtaps(one: Side) -> None:
    one.ensure()
    assert one.macvtaps.remove(IFNAME)
    assert not one.macvtaps.remove(IFNAME)
    assert not one.macvtaps.remove("lw0")
    assert one.ns.link(IFNAME) is None and one.ns.link("lw0") is not None


def test_a_passthru_lower_link_held_names_the_device_holding_it(one: Side) -> None:
    one.ensure("lw0Mvp0", Mode.PASSTHRU)
    one.macvtaps.flush()
    with pytest.raises(LowerLinkBusy) as held:
        one.ensure("lw0Mvp1", Mode.BRIDGE)
    assert held.value.passthru and held.value.holder == "lw0Mvp0"
    assert "held by the passthru macvtap of device lw0Mvp0" in str(held.value)
    assert len(one.ns.macvtaps()) == 1


def test_a_passthru_macvtap_moved_into_a_pod_is_named_too(one: Side) -> None:
    pod = NetNS()
    try:
        one.ensure("lw0Mvp0", Mode.PASSTHRU)
        one.ns.ip("link", "set", IFNAME, "netns", pod.name)
        with pytest.raises(LowerLinkBusy) as held:
            one.ensure("lw0Mvp0", Mode.PASSTHRU)
        assert held.value.passthru
        assert "lw0Mvp0's own, still in a pod" in str(held.value)
    finally:
        pod.close()


def test_a_bridge_port_is_busy(one: Side) -> None:
    one.ns.ip("link", "add", "br0", "type", "bridge")
    one.ns.ip("link", "set", "lw0", "master", "br0")
    with pytest.raises(LowerLinkBusy, match="a port of a bridge"):
        one.ensure()
    assert one.ns.macvtaps() == []
