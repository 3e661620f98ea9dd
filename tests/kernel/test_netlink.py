"""The pyroute2 adapters against the real kernel, checked with iproute2 as the oracle."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time

import pytest

from harness.netns import NetNS
from macvtapdp.errors import EventsLost, KernelError
from macvtapdp.linux.bpf import HIGH_INDEX
from macvtapdp.linux.link import IFF_LOOPBACK, Link
from macvtapdp.linux.linkevents import DELLINK, NEWLINK, LinkEvents
from macvtapdp.linux.netlink import Netlink
from macvtapdp.plugin.linkwatch import FOLLOWED_FLAGS

pytestmark = pytest.mark.kernel
ARPHRD_LOOPBACK = 772
MODES = ("bridge", "passthru", "private", "vepa")


def _index(ns: NetNS, name: str) -> int:
    found = ns.link(name)
    assert found is not None
    index: int = found["ifindex"]
    return index


def _wait_events(events: LinkEvents, timeout: float = 2.0) -> list[tuple[str, Link]]:
    """Everything queued once the queue turns readable."""
    assert select.select([events], [], [], timeout)[0], "no link event"
    return events.read()


def test_link_by_name_and_index_matches_iproute2(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Netlink() as netlink:
        lw0 = netlink.link(name="lw0")
        assert lw0 is not None
        assert netlink.link(index=lw0.index) == lw0
        lo = netlink.link(name="lo")
    assert lw0.index == _index(netns, "lw0")
    assert lw0.kind == "veth"
    assert lw0.lower_index == _index(netns, "lw0p")
    assert lw0.link_netnsid is None
    assert (lw0.mtu, lw0.txqlen) == (1500, 1000)
    assert lw0.admin_up and lw0.oper_ok and lw0.operstate == "UP"
    assert lo is not None and lo.index == 1 and lo.link_type == ARPHRD_LOOPBACK
    assert lo.flags & IFF_LOOPBACK and lo.lower_index is None and lo.kind is None


def test_missing_link_is_none(netns: NetNS) -> None:
    with netns.entered(), Netlink() as netlink:
        assert netlink.link(name="nosuch0") is None
        assert netlink.link(index=4242) is None


def test_links_dumps_every_link(netns: NetNS) -> None:
    netns.veth("lw0")
    netns.veth("lw1")
    with netns.entered(), Netlink() as netlink:
        links = netlink.links()
    assert {(link.index, link.name) for link in links} == {
        (found["ifindex"], found["ifname"]) for found in netns.links()
    }


@pytest.mark.parametrize("mode", MODES)
def test_add_macvtap_in_each_mode_with_index_and_altname(netns: NetNS, mode: str) -> None:
    netns.veth("lw0")
    netns.ip("link", "set", "lw0", "txqueuelen", "1234")
    with netns.entered(), Netlink() as netlink:
        lower = netlink.link(name="lw0")
        assert lower is not None
        netlink.add_macvtap(
            "mvt0", lower.index, mode, index=HIGH_INDEX + 7, txqlen=lower.txqlen, altname="aMvp0"
        )
        made = netlink.link(name="aMvp0")  # found by its altname too
    shown = netns.link("mvt0")
    assert shown is not None
    assert shown["ifindex"] == HIGH_INDEX + 7
    assert shown["linkinfo"]["info_kind"] == "macvtap"
    assert shown["linkinfo"]["info_data"]["mode"] == mode
    assert shown["link"] == "lw0"
    assert shown["txqlen"] == 1234
    assert shown["altnames"] == ["aMvp0"]
    assert shown["operstate"] == "UP" and "UP" in shown["flags"]
    assert made is not None and made.index == shown["ifindex"] and made.name == "mvt0"
    assert made.kind == "macvtap" and made.macvlan_mode == mode and made.altnames == ("aMvp0",)
    assert made.lower_index == lower.index and made.txqlen == 1234 and made.admin_up


def test_set_up_and_add_altname(netns: NetNS) -> None:
    netns.veth("lw0")
    netns.ip("link", "add", "link", "lw0", "name", "mvt0", "type", "macvtap")
    index = _index(netns, "mvt0")
    with netns.entered(), Netlink() as netlink:
        netlink.set_up(index)
        netlink.add_altname(index, "aMvp1")
    shown = netns.link("mvt0")
    assert shown is not None and "UP" in shown["flags"] and shown["altnames"] == ["aMvp1"]


def test_add_macvtap_errors_are_kernel_errors_with_their_errno(netns: NetNS) -> None:
    netns.veth("lw0")
    netns.veth("lw1")
    with netns.entered(), Netlink() as netlink:
        lw0, lw1 = _index(netns, "lw0"), _index(netns, "lw1")
        netlink.add_macvtap("mvt0", lw0, "bridge")
        with pytest.raises(KernelError) as exists:
            netlink.add_macvtap("mvt0", lw0, "bridge")
        with pytest.raises(KernelError) as index_taken:
            netlink.add_macvtap("mvt1", lw0, "bridge", index=lw1)
        with pytest.raises(KernelError) as no_lower:
            netlink.add_macvtap("mvt1", 4242, "bridge")
        netlink.add_macvtap("mvt2", lw1, "passthru")
        with pytest.raises(KernelError) as second_passthru:
            netlink.add_macvtap("mvt3", lw1, "bridge")
        netlink.add_macvtap("mvt5", lw0, "bridge", altname="taken")
        with pytest.raises(KernelError) as altname_taken:
            netlink.add_macvtap("mvt6", lw0, "bridge", altname="taken")
    assert exists.value.errno == errno.EEXIST
    assert str(exists.value).startswith("create macvtap mvt0: File exists")
    assert isinstance(exists.value, OSError)
    assert index_taken.value.errno == errno.EEXIST
    assert no_lower.value.errno == errno.ENODEV
    assert second_passthru.value.errno == errno.EINVAL
    assert altname_taken.value.errno == errno.EEXIST
    # the half-made macvtap of a failed altname is gone again
    assert {link["ifname"] for link in netns.macvtaps()} == {"mvt0", "mvt2", "mvt5"}


def test_delete(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Netlink() as netlink:
        netlink.add_macvtap("mvt0", _index(netns, "lw0"), "bridge")
        made = netlink.link(name="mvt0")
        assert made is not None
        netlink.delete(made.index)
        assert netns.link("mvt0") is None
        with pytest.raises(KernelError) as gone:
            netlink.delete(made.index)
    assert gone.value.errno == errno.ENODEV
    assert str(gone.value) == f"delete link {made.index}: No such device"


def test_one_owner_thread_serves_every_calling_thread(netns: NetNS) -> None:
    """pyroute2's sockets are per thread: ours are the owner thread's, whoever calls."""
    netns.veth("lw0")
    wrong: list[object] = []
    with netns.entered(), Netlink() as netlink:
        want = netlink.link(name="lw0")
        before = len(_netlink_fds())

        def ask() -> None:
            for i in range(50):
                if i % 2:
                    got = netlink.link(name="lw0")
                else:
                    got = next(link for link in netlink.links() if link.name == "lw0")
                if got != want:
                    wrong.append(got)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(_netlink_fds()) == before  # no socket per calling thread
    assert not wrong


def _netlink_fds() -> list[str]:
    import os

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.append(target)
    return found


def test_events_report_link_changes(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), LinkEvents() as events:
        assert events.read() == []
        netns.ip("link", "set", "lw0", "down")
        down = [link for kind, link in _wait_events(events) if link.name == "lw0"]
        assert down and all(not link.admin_up for link in down)
        index = _index(netns, "lw0")
        netns.ip("link", "del", "lw0")
        seen: list[tuple[str, Link]] = []
        while not any(kind == DELLINK for kind, _ in seen):
            seen += _wait_events(events)
    assert (DELLINK, "lw0", index) in {(kind, link.name, link.index) for kind, link in seen}


def test_events_are_all_seen_in_a_burst(netns: NetNS) -> None:
    """pyroute2 reads several datagrams at a time: none may wait for the next one."""
    with netns.entered(), LinkEvents() as events:
        for i in range(20):
            netns.ip("link", "add", f"b{i}", "type", "veth", "peer", "name", f"b{i}p")
        names: set[str] = set()
        deadline = time.monotonic() + 5
        while len(names) < 40 and time.monotonic() < deadline:
            names |= {link.name for _, link in _wait_events(events)}
    assert len(names) == 40


def test_events_lost_on_overrun(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), LinkEvents() as events:
        assert events._sock is not None
        events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # overflow at once
        time.sleep(0.1)
        for _ in range(20):
            netns.ip("link", "set", "lw0", "down")
            netns.ip("link", "set", "lw0", "up")
        with pytest.raises(EventsLost) as lost:
            while True:
                _wait_events(events)
        assert lost.value.errno == errno.ENOBUFS
        events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        time.sleep(0.1)
        with contextlib.suppress(EventsLost):
            events.read()
        netns.ip("link", "set", "lw0", "down")  # the subscription still works
        assert any(link.name == "lw0" for _, link in _wait_events(events))


def test_filter_passes_only_the_followed_link(netns: NetNS) -> None:
    """The kernel filter: our index, or our name (a link created again), nothing else."""
    netns.veth("lw0")
    netns.veth("other")
    with netns.entered(), Netlink() as netlink, LinkEvents() as events, LinkEvents() as by_name:
        first = netlink.link(name="lw0")
        assert first is not None
        events.only("lw0", first.index, flags_mask=FOLLOWED_FLAGS)
        by_name.only("later0", None, flags_mask=FOLLOWED_FLAGS)
        netns.ip("link", "set", "other", "down")
        netns.ip("link", "set", "lw0", "down")
        netns.ip("link", "del", "lw0")
        netns.veth("lw0")
        netns.ip("link", "add", "later0", "type", "veth", "peer", "name", "later0p")
        time.sleep(0.2)
        seen = {(kind, link.name) for kind, link in events.read()}
        assert seen == {(NEWLINK, "lw0"), (DELLINK, "lw0")}
        assert {link.name for _, link in by_name.read()} == {"later0"}


def test_filter_drops_events_that_change_nothing_followed(netns: NetNS) -> None:
    """With the link's state: a macvtap made on it (an event, same flags) is dropped;
    a txqlen change, a bridge taking it as a port, going down, a rename and the
    deletion pass."""
    netns.veth("lw0")
    netns.ip("link", "add", "br0", "type", "bridge")
    with netns.entered(), Netlink() as netlink, LinkEvents() as events:
        netns.ip("link", "set", "lw0", "alias", "lower")  # an event: its size is what passes
        [*_, (_, lower)] = _wait_events(events)
        state = (lower.flags, lower.txqlen, lower.size)
        events.only("lw0", lower.index, state, flags_mask=FOLLOWED_FLAGS)
        netlink.add_macvtap("mvt0", lower.index, "bridge")
        time.sleep(0.2)
        assert events.read() == []
        netns.ip("link", "set", "lw0", "txqueuelen", "777")
        assert [link.txqlen for _, link in _wait_events(events)][-1] == 777
        netns.ip("link", "del", "mvt0")
        netns.ip("link", "set", "lw0", "master", "br0")
        assert any(link.master_index for _, link in _wait_events(events))
        netns.ip("link", "set", "lw0", "nomaster")
        netns.ip("link", "set", "lw0", "down")
        netns.ip("link", "set", "lw0", "name", "lw1")
        netns.ip("link", "del", "lw1")
        time.sleep(0.2)
        seen = [(kind, link.name, link.admin_up) for kind, link in events.read()]
    assert (NEWLINK, "lw0", False) in seen
    assert (NEWLINK, "lw1", False) in seen
    assert seen[-1][:2] == (DELLINK, "lw1")


def test_filter_passes_moves_of_high_numbered_macvtaps(netns: NetNS) -> None:
    """Our macvtaps are numbered from 2**30: their RTM_DELLINK says where they went."""
    other = NetNS()
    try:
        netns.veth("lw0")
        with netns.entered(), Netlink() as netlink, LinkEvents() as events:
            lower = netlink.link(name="lw0")
            assert lower is not None
            events.only(
                "lw0",
                lower.index,
                (lower.flags, lower.txqlen, lower.size),
                flags_mask=FOLLOWED_FLAGS,
                high_deletions=True,
            )
            netlink.add_macvtap("mvt0", lower.index, "bridge", index=HIGH_INDEX + 1)
            netlink.add_macvtap("mvt1", lower.index, "bridge", index=HIGH_INDEX + 2)
            netlink.add_macvtap("low0", lower.index, "bridge")
            netns.ip("link", "set", "mvt0", "netns", other.name)
            netns.ip("link", "del", "mvt1")
            netns.ip("link", "del", "low0")
            time.sleep(0.2)
            gone = {link.name: link for kind, link in events.read() if kind == DELLINK}
        assert set(gone) == {"mvt0", "mvt1"}
        assert gone["mvt0"].new_netnsid is not None and gone["mvt0"].new_index == HIGH_INDEX + 1
        assert gone["mvt1"].new_netnsid is None
    finally:
        other.close()
