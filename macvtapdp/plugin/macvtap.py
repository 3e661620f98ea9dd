"""A device's macvtap, and a ``/dev/tapN`` that is its own and stays its own.

``/dev`` is one devtmpfs for the whole kernel, but ifindexes are per network
namespace: ``/dev/tap4`` may be another namespace's macvtap (two kind nodes on
one host, a pod's netns). The kernel names a macvtap's node ``tap<ifindex>``
when it registers the device, and a name already taken gets no node. So each
macvtap is created with an ifindex of our choosing (``IFLA_IFINDEX``) for which
no ``/dev/tap<ifindex>`` exists, and its node is checked afterwards against the
device number sysfs gives in our own namespace. The kernel then owns the node:
it follows the macvtap into a pod's namespace (where the macvtap CNI moves it),
and disappears with it. We never make, overwrite or remove a node ourselves.

The indexes come from ``[2**30, 2**31)``, starting at a point derived from the
node's name and the device ID: far above what any namespace numbers its links
(so the macvtap keeps its index when it moves into a pod), the same path for
the same device when it is made again, and different nodes on one kernel start
from different points.

Allocate must be idempotent: the kubelet allocates an init container's
devices again for the app container, and the ``/dev/tapN`` it was given first
must stay valid. So a macvtap that already is what we would create, and whose
node is its own, is reused; anything else by that name is replaced; there are
never two. Each macvtap also carries the device ID as an alternative name,
which released macvtap CNIs (v0.13.1 and older) look it up by.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from macvtapdp.config import Mode
from macvtapdp.errors import AllocationError, KernelError, LinkMissingError, LowerLinkBusy
from macvtapdp.linux.bpf import HIGH_INDEX
from macvtapdp.linux.link import Link
from macvtapdp.linux.netlink import Netlink

log = logging.getLogger(__name__)

INDEX_SPAN = (1 << 31) - 1 - HIGH_INDEX
_TRIES = 16
_STEP = 7919  # a prime: a collision moves on to a different neighbourhood


@dataclass(frozen=True)
class Tap:
    """A macvtap and the character device a VM opens to use it."""

    ifname: str
    index: int
    path: str
    rdev: int


def candidates(dev_id: str, salt: str | None = None) -> list[int]:
    """The ifindexes to try for ``dev_id``, in order."""
    salt = socket.gethostname() if salt is None else salt
    start = xxhash.xxh64_intdigest(f"{salt}\0{dev_id}".encode()) % INDEX_SPAN
    return [HIGH_INDEX + (start + i * _STEP) % INDEX_SPAN for i in range(_TRIES)]


def node_path(index: int, dev_dir: str = "/dev") -> str:
    return os.path.join(dev_dir, f"tap{index}")


def sysfs_rdev(ifname: str, index: int, sysfs: str = "/sys") -> int | None:
    """The device number of macvtap ``ifname``'s tap, as sysfs in our namespace has it."""
    try:
        with open(f"{sysfs}/class/net/{ifname}/tap{index}/dev", encoding="ascii") as fh:
            major, minor = fh.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))


NodeId = tuple[int, int]  # (st_rdev, st_ino): a node made again gets a new inode


def node_id(path: str) -> NodeId | None:
    """The device number and inode of the character device ``path``, if it is one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_rdev, st.st_ino) if stat.S_ISCHR(st.st_mode) else None


def node_rdev(path: str) -> int | None:
    """The device number ``path`` opens, if it is a character device."""
    found = node_id(path)
    return found[0] if found else None


def own_node(link: Link, dev_dir: str = "/dev", sysfs: str = "/sys") -> Tap | None:
    """``link``'s Tap if ``/dev/tap<index>`` is its own device; None otherwise."""
    rdev = sysfs_rdev(link.name, link.index, sysfs)
    path = node_path(link.index, dev_dir)
    if rdev is None or node_rdev(path) != rdev:
        return None
    return Tap(link.name, link.index, path, rdev)


def is_wanted(link: Link, lower: Link, mode: Mode) -> bool:
    """True if ``link`` is exactly the macvtap we would create."""
    return (
        link.kind == "macvtap"
        and link.lower_index == lower.index
        and link.link_netnsid is None
        and link.macvlan_mode == mode.value
    )


class Macvtaps:
    """Makes and checks the macvtaps of one lower link's devices."""

    def __init__(
        self,
        netlink: Netlink,
        *,
        dev_dir: str = "/dev",
        sysfs: str = "/sys",
        salt: str | None = None,
    ) -> None:
        self.netlink = netlink
        self.dev_dir = dev_dir
        self.sysfs = sysfs
        self.salt = salt
        self._altnames = Altnames(self.give_altname)

    def ensure(
        self, dev_id: str, ifname: str, lower: Link, mode: Mode, *, exists: bool = False
    ) -> tuple[Tap, bool]:
        """The tap of ``dev_id``'s macvtap on ``lower`` in ``mode``, and whether it is new.

        Creates first and looks only if the name is taken: a fresh device is
        the common case. With ``exists`` (the device was handed out before and
        its macvtap may still be there) it looks first. Raises LinkMissingError
        if ``lower`` went away, LowerLinkBusy if a passthru macvtap holds it,
        KernelError if the kernel refuses, AllocationError if no free node can
        be had.
        """
        for attempt in range(3):
            if not (exists and attempt == 0):
                try:
                    return self.create(dev_id, ifname, lower, mode), True
                except KernelError as err:
                    if err.errno != errno.EEXIST:
                        raise
            link = self.netlink.link(name=ifname)
            if link is not None and is_wanted(link, lower, mode):
                tap = own_node(link, self.dev_dir, self.sysfs)
                if tap is not None:
                    self._complete(link, dev_id)
                    return tap, False
                log.warning(
                    "replacing %s: /dev/tap%d is not its own device (another namespace's, or none)",
                    ifname,
                    link.index,
                )
            elif link is not None:
                log.warning(
                    "replacing %s (kind %s, lower index %s, mode %s): want a %s macvtap on %s",
                    ifname,
                    link.kind,
                    link.lower_index,
                    link.macvlan_mode,
                    mode.value,
                    lower.name,
                )
            elif attempt and not exists:
                log.info("%s came and went while it was being created; trying again", ifname)
            if link is not None:
                self.delete(link)
        raise KernelError(errno.EEXIST, f"create macvtap {ifname}", "its name stays taken")

    def create(
        self, dev_id: str, ifname: str, lower: Link, mode: Mode, index: int | None = None
    ) -> Tap:
        """A new macvtap with a node of its own (EEXIST if the name is taken).

        With ``index`` only that ifindex is tried (to make a device again at
        the path a container was given).
        """
        tried = [index] if index is not None else candidates(dev_id, self.salt)
        for n in tried:
            path = node_path(n, self.dev_dir)
            if os.path.lexists(path):
                continue  # another device's node, or a stale one: never ours to touch
            try:
                self.netlink.add_macvtap(
                    ifname, lower.index, mode.value, index=n, txqlen=lower.txqlen
                )
            except KernelError as err:
                if err.errno == errno.EEXIST and self.netlink.link(name=ifname) is None:
                    continue  # the index, not the name, is taken in our namespace
                mapped = self._refused(err, dev_id, ifname, lower, mode)
                if mapped is err:
                    raise
                raise mapped from err
            rdev = sysfs_rdev(ifname, n, self.sysfs)
            if rdev is not None and node_rdev(path) == rdev:
                self._altnames.add(n, ifname, dev_id, lower.index)
                return Tap(ifname, n, path, rdev)
            # Someone else's node appeared in between (or no devtmpfs): not ours
            log.warning("%s has no node of its own at %s; trying another index", ifname, path)
            self._delete_index(n)
            if index is not None:
                break
        where = f"/dev/tap{index}" if index is not None else f"{len(tried)} free /dev/tapN names"
        raise AllocationError(
            f"cannot give {dev_id} a device node of its own: tried {where} "
            f"(is {self.dev_dir} the host's devtmpfs?)"
        )

    def delete(self, link: Link) -> bool:
        """Delete ``link``; False if it was already gone."""
        return self._delete_index(link.index)

    def remove(self, ifname: str) -> bool:
        """Delete macvtap ``ifname``; False if there is no macvtap of that name."""
        link = self.netlink.link(name=ifname)
        if link is None or link.kind != "macvtap":
            return False
        return self.delete(link)

    def _delete_index(self, index: int) -> bool:
        try:
            self.netlink.delete(index)
        except KernelError as err:
            if err.errno == errno.ENODEV:
                return False
            raise
        return True

    def _complete(self, link: Link, dev_id: str) -> None:
        """A reused macvtap: up, and with its altname (an older macvtapdp made it)."""
        if not link.admin_up:
            self.netlink.set_up(link.index)
        if dev_id not in link.altnames:
            try:
                self.give_altname(link.index, dev_id, link.lower_index)
            except KernelError as err:  # another link has that altname: keep serving
                log.warning("cannot give %s the altname %s: %s", link.name, dev_id, err)

    def _refused(
        self, err: KernelError, dev_id: str, ifname: str, lower: Link, mode: Mode
    ) -> Exception:
        """What the kernel's refusal to create ``ifname`` means, as our error."""
        if err.errno == errno.ENODEV:
            return LinkMissingError(f"lower link {lower.name} disappeared")
        if err.errno in (errno.EBUSY, errno.EINVAL):
            holder = self._passthru_holder(lower, ifname)
            if holder is not None or (mode is Mode.PASSTHRU and err.errno == errno.EINVAL):
                return self._busy(lower, holder, dev_id)
            if err.errno == errno.EBUSY:
                return LowerLinkBusy(
                    f"lower link {lower.name} is busy: a port of a bridge, bond or team"
                )
        return err

    def give_altname(self, index: int, dev_id: str, lower_index: int | None) -> None:
        """Give macvtap ``index`` the device ID as its altname.

        The Go plugin named its macvtaps after the device ID itself. One such,
        on our lower link, holds the name: it is that plugin's macvtap of this
        very device, which the kubelet has just allocated again (so no pod
        holds it), and released CNIs would find it instead of ours. It goes.
        """
        try:
            self.netlink.add_altname(index, dev_id)
            return
        except KernelError as err:
            if err.errno != errno.EEXIST:
                raise
            holder = self.netlink.link(name=dev_id)
            if (
                holder is None
                or holder.name != dev_id
                or holder.kind != "macvtap"
                or holder.link_netnsid is not None
                or holder.lower_index != lower_index
            ):
                raise
        log.info(
            "deleted %s (/dev/tap%d), the Go plugin's macvtap of this device: its ID was "
            "allocated again, so no pod holds it",
            dev_id,
            holder.index,
        )
        self._delete_index(holder.index)
        self.netlink.add_altname(index, dev_id)

    def flush(self) -> None:
        """Add the altnames still queued, now."""
        self._altnames.flush()

    def close(self) -> None:
        """Add the altnames still queued, now; then no more (the netlink goes next)."""
        self._altnames.close()

    def _passthru_holder(self, lower: Link, ifname: str) -> Link | None:
        """The passthru macvtap (other than ``ifname``) that holds ``lower``, if any."""
        for link in self.netlink.links():
            if (
                link.kind == "macvtap"
                and link.lower_index == lower.index
                and link.macvlan_mode == "passthru"
                and link.name != ifname
            ):
                return link
        return None

    def _busy(self, lower: Link, holder: Link | None, dev_id: str) -> LowerLinkBusy:
        if holder is None:
            return LowerLinkBusy(
                f"lower link {lower.name} is held by a passthru macvtap in another network "
                f"namespace: {dev_id}'s own, still in a pod (the macvtap CNI moved it there), "
                "or another plugin's",
                dev_id,
                passthru=True,
            )
        device = next((a for a in holder.altnames if "Mvp" in a), None)
        who = f"device {device} ({holder.name})" if device else holder.name
        return LowerLinkBusy(
            f"lower link {lower.name} is held by the passthru macvtap of {who}",
            device,
            passthru=True,
        )


class Altnames:
    """Device IDs added as altnames by a thread of its own, just after Allocate answers.

    Only the macvtap CNI (releases up to v0.13.1) looks the interface up by
    it, when the pod's sandbox is made, well after the Allocate: the request
    need not wait for it (half a millisecond of netlink, and the hand-over to
    the netlink thread). The thread waits ``DELAY`` so that the answer goes out
    first. A reused macvtap gets its altname if it is missing.
    """

    DELAY = 0.01

    def __init__(self, give: Callable[[int, str, int | None], None]) -> None:
        self._give = give  # Macvtaps.give_altname
        self._cond = threading.Condition()
        self._pending: list[tuple[int, str, str, int | None]] = []
        self._busy = False
        self._closed = False
        threading.Thread(target=self._run, name="altnames", daemon=True).start()

    def add(self, index: int, ifname: str, dev_id: str, lower_index: int | None) -> None:
        with self._cond:
            self._pending.append((index, ifname, dev_id, lower_index))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            time.sleep(self.DELAY)
            self._drain()

    def _drain(self) -> None:
        with self._cond:
            while self._busy:  # another thread is naming: let it finish
                self._cond.wait()
            items, self._pending = self._pending, []
            self._busy = True
        try:
            for item in items:
                self._name(item)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self) -> None:
        """Name everything queued, and wait for what is being named."""
        self._drain()

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True

    def _name(self, item: tuple[int, str, str, int | None]) -> None:
        if self._closed:
            return
        index, ifname, dev_id, lower_index = item
        try:
            self._give(index, dev_id, lower_index)
        except KernelError as err:
            # gone already (rolled back), or we are stopping: nothing to name
            if err.errno not in (errno.ENODEV, errno.ESHUTDOWN):
                log.warning("cannot give %s the altname %s: %s", ifname, dev_id, err)
