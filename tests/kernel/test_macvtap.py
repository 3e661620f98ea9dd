"""ensure()/remove() against the real kernel and the real /dev/tapN."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from macvtapdp.config import Mode
from macvtapdp.errors import AllocationError, LinkMissingError
from macvtapdp.macvtap import Tap, ensure, remove
from macvtapdp.rtnl import Rtnl
from tests import frames
from tests.netns import NetNS

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


def _shown(ns: NetNS, name: str) -> dict[str, object]:
    found = ns.link(name)
    assert found is not None, f"{name} does not exist"
    return found


def _assert_tap_of(tap: Tap, ns: NetNS, lower: str, mode: Mode) -> None:
    """``tap`` is an up macvtap on ``lower`` in ``mode`` whose /dev node is its own."""
    shown = ns.link(tap.ifname)
    assert shown is not None
    assert shown["linkinfo"]["info_kind"] == "macvtap"
    assert shown["linkinfo"]["info_data"]["mode"] == mode.value
    assert shown["link"] == lower and "UP" in shown["flags"]
    assert tap.index == shown["ifindex"] and tap.path == f"/dev/tap{tap.index}"
    node = os.stat(tap.path)
    assert stat.S_ISCHR(node.st_mode)
    owner = os.readlink(f"/sys/dev/char/{os.major(node.st_rdev)}:{os.minor(node.st_rdev)}")
    assert owner.endswith(f"/net/{tap.ifname}/macvtap/tap{tap.index}")


def test_creates_an_up_macvtap_with_the_lower_txqlen(netns: NetNS) -> None:
    netns.veth("lw0")
    netns.ip("link", "set", "lw0", "txqueuelen", "1234")
    with netns.entered(), Rtnl() as rtnl:
        tap, created = ensure(rtnl, "mvt0", "lw0", Mode.VEPA)
        _assert_tap_of(tap, netns, "lw0", Mode.VEPA)
    assert created
    assert _shown(netns, "mvt0")["txqlen"] == 1234


def test_reuses_the_same_macvtap(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl:
        first, created = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        again, created_again = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        netns.ip("link", "set", "mvt0", "down")
        once_more, _ = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        _assert_tap_of(once_more, netns, "lw0", Mode.BRIDGE)  # and up again
    assert created and not created_again
    assert first == again == once_more
    assert len(netns.macvtaps()) == 1


@pytest.mark.parametrize(
    "squatter",
    [
        ["link", "add", "mvt0", "link", "lw0", "type", "macvtap", "mode", "vepa"],
        ["link", "add", "mvt0", "link", "lw1", "type", "macvtap", "mode", "bridge"],
        ["link", "add", "mvt0", "type", "veth", "peer", "name", "mvt0p"],
    ],
    ids=["wrong-mode", "other-lower", "veth"],
)
def test_replaces_anything_else_of_that_name(netns: NetNS, squatter: list[str]) -> None:
    netns.veth("lw0")
    netns.veth("lw1")
    netns.ip(*squatter)
    before = _shown(netns, "mvt0")["ifindex"]
    with netns.entered(), Rtnl() as rtnl:
        tap, created = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        _assert_tap_of(tap, netns, "lw0", Mode.BRIDGE)
    assert created and tap.index != before
    assert [link["ifname"] for link in netns.macvtaps()] == ["mvt0"]


def test_missing_lower_creates_nothing(netns: NetNS) -> None:
    with netns.entered(), Rtnl() as rtnl, pytest.raises(LinkMissingError, match="nosuch0"):
        ensure(rtnl, "mvt0", "nosuch0", Mode.BRIDGE)
    assert netns.link("mvt0") is None and netns.macvtaps() == []


def test_unfixable_node_leaves_nothing(netns: NetNS, tmp_path: Path) -> None:
    """No node in ``dev_dir`` and no sysfs view of the namespace: fail, delete the macvtap."""
    netns.veth("lw0")
    name = f"mvt{secrets.token_hex(4)}"  # so that the host's /sys cannot show it
    with netns.entered(), Rtnl() as rtnl, pytest.raises(AllocationError, match=name):
        ensure(rtnl, name, "lw0", Mode.BRIDGE, dev_dir=str(tmp_path))
    assert netns.macvtaps() == [] and list(tmp_path.iterdir()) == []


def test_remove_deletes_only_macvtaps(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl:
        ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        assert remove(rtnl, "mvt0")
        assert not remove(rtnl, "mvt0")
        assert not remove(rtnl, "lw0")
    assert netns.link("mvt0") is None and netns.link("lw0") is not None


def test_frames_pass_both_ways_through_dev_tap(netns: NetNS) -> None:
    netns.veth("lw0")
    with netns.entered(), Rtnl() as rtnl:
        tap, _ = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        tap_mac = str(_shown(netns, "mvt0")["address"])
        peer_mac = str(_shown(netns, "lw0p")["address"])
        fd = frames.open_tap(tap.path)
        try:
            with frames.packet_socket("lw0p") as peer:
                inbound = secrets.token_bytes(8)
                peer.send(frames.frame(tap_mac, peer_mac, inbound))
                got = frames.read_tap(fd, inbound)
                outbound = secrets.token_bytes(8)
                frames.write_tap(fd, frames.frame(peer_mac, tap_mac, outbound))
                sent = frames.recv_packet(peer, outbound)
        finally:
            os.close(fd)
    assert got[:6] == frames.mac_bytes(tap_mac) and got[6:12] == frames.mac_bytes(peer_mac)
    assert sent[:6] == frames.mac_bytes(peer_mac) and sent[6:12] == frames.mac_bytes(tap_mac)


# Runs under `ip netns exec`, whose private /sys shows the namespace's links,
# so ensure() can read the tap's true device number and remake the node.
_REPAIR = textwrap.dedent(
    """
    import os, stat
    from macvtapdp.config import Mode
    from macvtapdp.macvtap import ensure
    from macvtapdp.rtnl import Rtnl

    with Rtnl() as rtnl:
        tap, _ = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
        want = os.stat(tap.path).st_rdev
        try:
            os.unlink(tap.path)
            missing = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
            assert missing == (tap, False) and os.stat(tap.path).st_rdev == want
            os.unlink(tap.path)
            os.mknod(tap.path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's
            foreign = ensure(rtnl, "mvt0", "lw0", Mode.BRIDGE)
            assert foreign == (tap, False) and os.stat(tap.path).st_rdev == want
        finally:
            rtnl.delete(tap.index)
            # devtmpfs removes only nodes it made itself: remove the one we made.
            if os.path.exists(tap.path) and os.stat(tap.path).st_rdev == want:
                os.unlink(tap.path)
    print("repaired")
    """
)


def test_remakes_a_missing_or_foreign_dev_node(netns: NetNS) -> None:
    netns.veth("lw0")
    done = subprocess.run(
        netns.argv([sys.executable, "-c", _REPAIR]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "repaired"
    remade = [line for line in done.stderr.splitlines() if "remade /dev/tap" in line]
    assert len(remade) == 2, done.stderr
    assert "missing" in remade[0] and "another device's" in remade[1]
