"""Make sure a device's macvtap exists, is up, and has a valid ``/dev/tapN``.

Allocate must be idempotent: the kubelet allocates an init container's
devices again for the app container, and the ``/dev/tapN`` it was given first
must stay valid. So a macvtap that already is what we would create is reused;
anything else by that name is replaced; there are never two.

``/dev`` is global but ifindexes are per network namespace, so ``/dev/tapN``
can be missing or belong to another namespace's macvtap: the node is checked
against sysfs and remade if needed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass

from macvtapdp.config import Mode
from macvtapdp.errors import AllocationError, LinkMissingError
from macvtapdp.rtnl import MACVLAN_MODE, Link, NetlinkError, Rtnl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tap:
    """A macvtap and the character device a VM opens to use it."""

    ifname: str
    index: int
    path: str


def ensure(
    rtnl: Rtnl, ifname: str, lower: str, mode: Mode, *, dev_dir: str = "/dev"
) -> tuple[Tap, bool]:
    """The tap of macvtap ``ifname`` on ``lower`` in ``mode``, and whether it was created now.

    Creates first and looks only if the name is taken: a fresh device is the
    common case, and a lookup is a tenth of a create. Raises LinkMissingError
    if ``lower`` does not exist, NetlinkError if the kernel refuses the macvtap,
    AllocationError if its device node cannot be made right (a macvtap created
    by this call is then deleted again).
    """
    low = rtnl.link(name=lower)
    if low is None:
        raise LinkMissingError(f"lower link {lower} does not exist")
    for attempt in range(3):
        try:
            return _created(rtnl, ifname, low, mode, dev_dir), True
        except NetlinkError as err:
            if err.errno != errno.EEXIST:
                raise
        link = rtnl.link(name=ifname)
        if link is not None and _is_wanted(link, low, mode):
            if not link.admin_up:
                rtnl.set_up(link.index)
            return _tap(link, dev_dir), False
        if link is not None:
            log.warning(
                "replacing %s (kind %s, lower index %s, mode %s): want a %s macvtap on %s",
                ifname,
                link.kind,
                link.lower_index,
                link.macvlan_mode,
                mode.value,
                lower,
            )
            _delete(rtnl, link)
        elif attempt:
            log.info("%s came and went while it was being created; trying again", ifname)
    raise NetlinkError(errno.EEXIST, f"create macvtap {ifname}", "its name stays taken")


def remove(rtnl: Rtnl, ifname: str) -> bool:
    """Delete macvtap ``ifname``; False if there is no macvtap of that name."""
    link = rtnl.link(name=ifname)
    if link is None or link.kind != "macvtap":
        return False
    return _delete(rtnl, link)


def _created(rtnl: Rtnl, ifname: str, low: Link, mode: Mode, dev_dir: str) -> Tap:
    """Create the macvtap (EEXIST if the name is taken) and return its checked tap."""
    try:
        link = rtnl.add_macvtap(ifname, low.index, mode.value, txqlen=low.txqlen)
    except NetlinkError as err:
        if err.errno == errno.ENODEV:
            raise LinkMissingError(f"lower link {low.name} disappeared: {err}") from err
        raise
    try:
        return _tap(link, dev_dir)
    except BaseException:
        _delete(rtnl, link)
        raise


def _is_wanted(link: Link, lower: Link, mode: Mode) -> bool:
    """True if ``link`` is exactly the macvtap we would create."""
    return (
        link.kind == "macvtap"
        and link.lower_index == lower.index
        and link.link_netnsid is None
        and link.macvlan_mode == MACVLAN_MODE[mode.value]
    )


def _delete(rtnl: Rtnl, link: Link) -> bool:
    """Delete ``link``; False if it was already gone."""
    try:
        rtnl.delete(link.index)
    except NetlinkError as err:
        if err.errno == errno.ENODEV:
            return False
        raise
    return True


def _tap(link: Link, dev_dir: str) -> Tap:
    """``link``'s Tap, after making sure its device node is its own."""
    tap = Tap(link.name, link.index, os.path.join(dev_dir, f"tap{link.index}"))
    found = _node_owner(tap.path)
    if found is not None and found.endswith(_sysfs_suffix(tap)):
        return tap
    rdev = _true_rdev(tap)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tap.path)
        os.mknod(tap.path, 0o600 | stat.S_IFCHR, rdev)
    except OSError as err:
        raise AllocationError(f"cannot remake {tap.path} for {tap.ifname}: {err}") from err
    now = _node_owner(tap.path)
    if now is None or not now.endswith(_sysfs_suffix(tap)):
        raise AllocationError(f"{tap.path} is not {tap.ifname}'s device even after mknod: {now}")
    log.warning(
        "remade %s for %s (%d:%d): it was %s",
        tap.path,
        tap.ifname,
        os.major(rdev),
        os.minor(rdev),
        "missing" if found is None else f"another device's ({found})",
    )
    return tap


def _sysfs_suffix(tap: Tap) -> str:
    # The macvtap class is per network namespace, so sysfs puts the tap in a
    # "macvtap" glue directory under its net device.
    return f"/net/{tap.ifname}/macvtap/tap{tap.index}"


def _node_owner(path: str) -> str | None:
    """The sysfs path of the device node ``path`` opens (or why there is none); None if missing."""
    try:
        node = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISCHR(node.st_mode):
        return "not a character device"
    dev = f"{os.major(node.st_rdev)}:{os.minor(node.st_rdev)}"
    try:
        return os.readlink(f"/sys/dev/char/{dev}")
    except FileNotFoundError:
        return f"{dev}, which no device has"


def _true_rdev(tap: Tap) -> int:
    """The device number sysfs gives ``tap`` (needs /sys of our network namespace)."""
    path = f"/sys/class/net/{tap.ifname}/tap{tap.index}/dev"
    try:
        with open(path, encoding="ascii") as fh:
            major, minor = fh.read().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError) as err:
        raise AllocationError(
            f"{tap.path} is missing or not {tap.ifname}'s, and {path} cannot be read: {err}"
        ) from err
