"""The rtnetlink client against the real kernel, checked with iproute2 as the oracle."""

from __future__ import annotations

import errno
import select
import socket
import threading
import time

import pytest

from macvtapdp.rtnl import (
    ARPHRD_LOOPBACK,
    IF_OPER_UP,
    IFF_LOOPBACK,
    MACVLAN_MODE,
    RTM_DELLINK,
    RTM_NEWLINK,
    EventsLost,
    Link,
    LinkMonitor,
    NetlinkError,
    Rtnl,
)
from tests.netns import NetNS

pytestmark = pytest.mark.kernel


def _index(ns: NetNS, name: str) -> int:
    found = ns.link(name)
    assert found is not None
    index: int = found["ifindex"]
    return index


def _wait_events(monitor: LinkMonitor, timeout: float = 2.0) -> list[tuple[int, Link]]:
    """Everything queued once the monitor turns readable."""
    assert select.select([monitor], [], [], timeout)[0], "no link event"
    return monitor.read()


def test_link_by_name_and_index_matches_iproute2(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl:
        lw0 = rtnl.link(name="lw0")
        assert lw0 is not None
        assert rtnl.link(index=lw0.index) == lw0
        lo = rtnl.link(name="lo")
    assert lw0.index == _index(netns, "lw0")
    assert lw0.kind == "veth"
    assert lw0.lower_index == _index(netns, "lw0p")
    assert lw0.link_netnsid is None
    assert (lw0.mtu, lw0.txqlen) == (1500, 1000)
    assert lw0.admin_up and lw0.oper_ok and lw0.operstate == IF_OPER_UP
    assert lo is not None and lo.index == 1 and lo.link_type == ARPHRD_LOOPBACK
    assert lo.flags & IFF_LOOPBACK and lo.lower_index is None and lo.kind is None


def test_missing_link_is_none(netns: NetNS) -> None:
    with netns.entered(), Rtnl() as rtnl:
        assert rtnl.link(name="nosuch0") is None
        assert rtnl.link(index=4242) is None
        with pytest.raises(ValueError):
            rtnl.link()


def test_links_dumps_every_link(netns: NetNS) -> None:
    netns.veth("lw0")
    netns.veth("lw1")
    with netns.entered(), Rtnl() as rtnl:
        links = rtnl.links()
    assert {(link.index, link.name) for link in links} == {
        (found["ifindex"], found["ifname"]) for found in netns.links()
    }


@pytest.mark.parametrize("mode", sorted(MACVLAN_MODE))
def test_add_macvtap_in_each_mode(netns: NetNS, mode: str) -> None:
    netns.veth("lw0")
    netns.ip("link", "set", "lw0", "txqueuelen", "1234")
    with netns.entered(), Rtnl() as rtnl:
        lower = rtnl.link(name="lw0")
        assert lower is not None
        made = rtnl.add_macvtap("mvt0", lower.index, mode, txqlen=lower.txqlen)
    shown = netns.link("mvt0")
    assert shown is not None
    assert shown["linkinfo"]["info_kind"] == "macvtap"
    assert shown["linkinfo"]["info_data"]["mode"] == mode
    assert shown["link"] == "lw0"
    assert shown["txqlen"] == 1234
    assert shown["operstate"] == "UP" and "UP" in shown["flags"]
    assert made.index == shown["ifindex"] and made.name == "mvt0"
    assert made.kind == "macvtap" and made.macvlan_mode == MACVLAN_MODE[mode]
    assert made.lower_index == lower.index and made.txqlen == 1234 and made.admin_up


def test_add_macvtap_down_then_set_up(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl:
        made = rtnl.add_macvtap("mvt0", _index(netns, "lw0"), "bridge", up=False)
        assert not made.admin_up
        shown = netns.link("mvt0")
        assert shown is not None and "UP" not in shown["flags"]
        assert shown["txqlen"] == 500  # the kernel's default when none is given
        rtnl.set_up(made.index)
    shown = netns.link("mvt0")
    assert shown is not None and "UP" in shown["flags"]


def test_add_macvtap_errors(netns: NetNS) -> None:
    netns.veth("lw0")
    netns.veth("lw1")
    with netns.entered(), Rtnl() as rtnl:
        lw0, lw1 = _index(netns, "lw0"), _index(netns, "lw1")
        rtnl.add_macvtap("mvt0", lw0, "bridge")
        with pytest.raises(NetlinkError) as exists:
            rtnl.add_macvtap("mvt0", lw0, "bridge")
        with pytest.raises(NetlinkError) as no_lower:
            rtnl.add_macvtap("mvt1", 4242, "bridge")
        rtnl.add_macvtap("mvt2", lw1, "passthru")
        with pytest.raises(NetlinkError) as second_passthru:
            rtnl.add_macvtap("mvt3", lw1, "bridge")
        with pytest.raises(ValueError):
            rtnl.add_macvtap("mvt4", lw0, "source")
    assert exists.value.errno == errno.EEXIST
    assert str(exists.value).startswith("create macvtap mvt0: File exists")
    assert isinstance(exists.value, OSError)
    assert no_lower.value.errno == errno.ENODEV
    assert second_passthru.value.errno == errno.EINVAL
    assert {link["ifname"] for link in netns.macvtaps()} == {"mvt0", "mvt2"}


def test_delete(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl:
        made = rtnl.add_macvtap("mvt0", _index(netns, "lw0"), "bridge")
        rtnl.delete(made.index)
        assert netns.link("mvt0") is None
        with pytest.raises(NetlinkError) as gone:
            rtnl.delete(made.index)
    assert gone.value.errno == errno.ENODEV
    assert str(gone.value) == f"delete link {made.index}: No such device"


def test_shared_between_threads(netns: NetNS) -> None:
    netns.veth("lw0")
    wrong: list[object] = []
    with netns.entered(), Rtnl() as rtnl:
        want = rtnl.link(name="lw0")

        def ask() -> None:
            for i in range(100):
                if i % 2:
                    got = rtnl.link(name="lw0")
                else:
                    got = next(link for link in rtnl.links() if link.name == "lw0")
                if got != want:
                    wrong.append(got)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not wrong


def test_monitor_reports_link_events(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), LinkMonitor() as monitor:
        assert monitor.read() == []
        netns.ip("link", "set", "lw0", "down")
        down = [link for kind, link in _wait_events(monitor) if link.name == "lw0"]
        assert down and all(not link.admin_up for link in down)
        index = _index(netns, "lw0")
        netns.ip("link", "del", "lw0")
        events = _wait_events(monitor)
    assert (RTM_DELLINK, "lw0", index) in {(kind, link.name, link.index) for kind, link in events}


def test_monitor_ignores_bridge_port_messages(netns: NetNS) -> None:
    """Leaving a bridge sends an AF_BRIDGE RTM_DELLINK for the port: not a deletion."""
    netns.veth("lw0")
    netns.ip("link", "add", "br0", "type", "bridge")
    with netns.entered(), LinkMonitor() as monitor:
        netns.ip("link", "set", "lw0", "master", "br0")
        netns.ip("link", "set", "lw0", "nomaster")
        netns.ip("link", "set", "lw0", "down")  # a last event, to know all are queued
        events: list[tuple[int, Link]] = []
        while not any(k == RTM_NEWLINK and not link.admin_up for k, link in events):
            events += _wait_events(monitor)
    assert [link for kind, link in events if kind == RTM_DELLINK] == []
    assert any(link.master_index == _index(netns, "br0") for _, link in events)


def test_monitor_raises_events_lost_on_overrun(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), LinkMonitor() as monitor:
        # The same socket, made to overflow quickly (the kernel's minimum buffer).
        same = socket.socket(fileno=socket.dup(monitor.fileno()))
        same.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        same.close()
        for _ in range(10):
            netns.ip("link", "set", "lw0", "down")
            netns.ip("link", "set", "lw0", "up")
        with pytest.raises(EventsLost) as lost:
            monitor.read()
        assert monitor.read() == []  # the queue was drained: resync, then follow
    assert lost.value.errno == errno.ENOBUFS


def test_monitor_only_passes_the_followed_link(netns: NetNS) -> None:
    """The kernel filter: our index, or our name (a link created again), nothing else."""
    netns.veth("lw0")
    netns.veth("other")
    with netns.entered(), Rtnl() as rtnl, LinkMonitor() as monitor, LinkMonitor() as by_name:
        first = rtnl.link(name="lw0")
        assert first is not None
        monitor.only("lw0", first.index)
        by_name.only("later0", None)
        netns.ip("link", "set", "other", "down")
        netns.ip("link", "set", "lw0", "down")
        netns.ip("link", "del", "lw0")
        netns.veth("lw0")
        netns.ip("link", "add", "later0", "type", "veth", "peer", "name", "later0p")
        netns.ip("link", "set", "lw0x", "up", check=False)  # no such link: no event
        time.sleep(0.2)
        seen = {(kind, link.name) for kind, link in monitor.read()}
        assert seen == {(RTM_NEWLINK, "lw0"), (RTM_DELLINK, "lw0")}
        assert {link.name for _, link in by_name.read()} == {"later0"}


def test_monitor_only_drops_events_that_change_nothing(netns: NetNS) -> None:
    """With the link's flags: a macvtap made on it (an event, same flags) is dropped;
    going down, a rename and the deletion pass."""
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl, LinkMonitor() as monitor:
        lower = rtnl.link(name="lw0")
        assert lower is not None
        monitor.only("lw0", lower.index, lower.flags)
        rtnl.add_macvtap("mvt0", lower.index, "bridge")
        time.sleep(0.2)
        assert monitor.read() == []
        netns.ip("link", "set", "lw0", "down")
        netns.ip("link", "set", "lw0", "name", "lw1")
        netns.ip("link", "del", "lw1")
        time.sleep(0.2)
        seen = [(kind, link.name, link.admin_up) for kind, link in monitor.read()]
    assert (RTM_NEWLINK, "lw0", False) in seen
    assert (RTM_NEWLINK, "lw1", False) in seen
    assert seen[-1][:2] == (RTM_DELLINK, "lw1")
