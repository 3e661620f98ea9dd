"""Allocate and PreStartContainer: one macvtap per device, all or nothing, and never the wrong one.

Requests are serialised (one lock per process): the kubelet sends them one at a
time anyway, and a lock makes "never two interfaces for one device" and the
rollback of a part-way failure simple to see. Each device's interface name is
the one the macvtap CNI derives from its ID, so the CNI finds it in the pod.

The kubelet caches the AllocateResponse and the container runtime resolves its
host path again at every container start, without asking us. So we keep, per
device, the ifindex whose ``/dev/tapN`` we handed out, and whether its macvtap
moved into another namespace (a pod's); and the kubelet calls PreStartContainer
before every start (we ask for it), where that path is checked: it must still
be the device's own macvtap, or be made so again, or the start is refused.
The record is written to the run directory so that a restarted process knows
it too; serving does not depend on being able to write it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from macvtapdp import files, naming
from macvtapdp.config import Resource
from macvtapdp.errors import (
    AllocationError,
    KernelError,
    LinkMissingError,
    LowerLinkBusy,
    MacvtapdpError,
)
from macvtapdp.linux.link import Link
from macvtapdp.plugin.macvtap import Macvtaps, NodeId, Tap, node_id, node_path, own_node

log = logging.getLogger(__name__)

_RECORD_LIMIT = 1 << 20


@dataclass(frozen=True)
class Allocation:
    """What one Allocate did for one device."""

    device: str
    path: str
    created: bool
    seconds: float


class Records:
    """Device ID -> (ifindex handed out, moved into another namespace), kept in a file.

    A moved macvtap's node is no longer shown by sysfs in our namespace, so its
    identity (device number and inode) is recorded when it moves: a node made
    at that path since is someone else's, even with the same minor (the kernel
    hands out the lowest free one again).

    The file is written by a thread of its own, at most every ``DELAY`` seconds
    and only when something changed: an Allocate does not wait for a disk (a
    full one, or a slow one), and a capacity of 1000 does not make every
    Allocate serialise 1000 entries. A restart within that delay forgets the
    newest entries; PreStartContainer then cannot re-make those devices' taps,
    and says so, but never hands out another's.
    """

    DELAY = 0.2

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, object]] = {}
        self._failing = False
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(files.read_regular(path, _RECORD_LIMIT))
                if isinstance(data, dict):
                    self._entries = {
                        k: v
                        for k, v in data.items()
                        if isinstance(v, dict) and isinstance(v.get("index"), int)
                    }
            threading.Thread(target=self._writer, name="records", daemon=True).start()

    def index(self, dev_id: str) -> int | None:
        entry = self._entries.get(dev_id)
        return int(entry["index"]) if entry else None  # type: ignore[call-overload]

    def moved(self, dev_id: str) -> bool:
        entry = self._entries.get(dev_id)
        return bool(entry and entry.get("moved"))

    def node(self, dev_id: str) -> NodeId | None:
        """The moved macvtap's node as it was just after the move, if recorded."""
        entry = self._entries.get(dev_id)
        found = entry.get("node") if entry else None
        if isinstance(found, list | tuple) and len(found) == 2:
            return int(found[0]), int(found[1])
        return None

    def set(self, dev_id: str, index: int, moved: bool = False, node: NodeId | None = None) -> None:
        new: dict[str, object] = {"index": index, "moved": moved}
        if node is not None:
            new["node"] = list(node)
        with self._lock:
            if self._entries.get(dev_id) == new:
                return
            self._entries[dev_id] = new
        self._dirty.set()

    def forget(self, dev_id: str) -> None:
        with self._lock:
            if self._entries.pop(dev_id, None) is None:
                return
        self._dirty.set()

    def flush(self) -> None:
        """Write now if anything changed (at shutdown)."""
        if self._dirty.is_set():
            self._dirty.clear()
            self._save()

    def _writer(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(self.DELAY)  # coalesce a burst of Allocates
            self._dirty.clear()
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            text = json.dumps(self._entries, sort_keys=True)
        try:
            files.write_atomically(self.path, text)
        except OSError as err:
            if not self._failing:
                log.warning(
                    "cannot write %s (%s): a restart will forget handed-out taps", self.path, err
                )
            self._failing = True
        else:
            self._failing = False


class LowerLink(Protocol):
    """The lower link as the link watcher last saw it, or read afresh."""

    def current(self) -> Link | None: ...

    def refresh(self) -> Link | None: ...


class Allocator:
    """Makes the macvtaps of ``resource``'s devices on its lower link."""

    def __init__(
        self,
        resource: Resource,
        macvtaps: Macvtaps,
        lower: LowerLink,
        records: Records,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resource = resource
        self.macvtaps = macvtaps
        self._lower = lower
        self.records = records
        self._lock = threading.Lock()
        self._devices = {naming.interface_name(i): i for i in resource.device_ids()}
        self._ids = frozenset(self._devices.values())
        self._clock = clock  # the sweep's, which compares against it
        self._used: dict[str, float] = {}  # device ID -> clock() of its last use

    def lower(self, *, fresh: bool = False) -> Link:
        """The lower link: as last seen (no netlink request), or read now."""
        link = self._lower.refresh() if fresh else self._lower.current()
        if link is None:
            raise LinkMissingError(f"lower link {self.resource.lower} does not exist")
        return link

    def _ensure(self, dev_id: str, lower: Link) -> tuple[Tap, bool, Link]:
        """``Macvtaps.ensure``, once more with the lower link read afresh if it seems gone."""
        ifname = naming.interface_name(dev_id)
        for fresh in (False, True):
            if fresh:
                lower = self.lower(fresh=True)  # also updates health
            try:
                tap, created = self.macvtaps.ensure(
                    dev_id,
                    ifname,
                    lower,
                    self.resource.mode,
                    exists=self.records.index(dev_id) is not None,
                )
                return tap, created, lower
            except (LinkMissingError, LowerLinkBusy):
                if fresh:
                    raise
            except KernelError as err:
                raise AllocationError(
                    f"cannot make macvtap {ifname} for {dev_id} on {self.resource.lower}: {err}"
                ) from err
        raise AssertionError("unreachable")

    def allocate(self, device_ids: Sequence[str]) -> list[Allocation]:
        """Ensure each device's macvtap exists and is up; what was done, in order.

        On any failure the macvtaps created by this call are deleted again
        (ones that already existed stay: an earlier Allocate handed them out).
        """
        made: list[Tap] = []
        done: list[Allocation] = []
        with self._lock:
            self._mark_used(device_ids)
            try:
                lower = self._lower.current() or self.lower(fresh=True)
                for dev_id in device_ids:
                    started = time.perf_counter()
                    tap, created, lower = self._ensure(dev_id, lower)
                    if created:
                        made.append(tap)
                    self.records.set(dev_id, tap.index)
                    done.append(
                        Allocation(dev_id, tap.path, created, time.perf_counter() - started)
                    )
            except BaseException:
                self._roll_back(made)
                raise
        return done

    def pre_start(self, device_ids: Sequence[str]) -> list[str]:
        """Before a container starts: each device's handed-out path must be its own macvtap.

        Returns a log line per device; raises AllocationError (the container
        must not start) when a path would give it another device.
        """
        notes: list[str] = []
        with self._lock:
            self._mark_used(device_ids)
            for dev_id in device_ids:
                notes.append(self._check(dev_id))
        return notes

    def _check(self, dev_id: str) -> str:
        ifname = naming.interface_name(dev_id)
        index = self.records.index(dev_id)
        link = self.macvtaps.netlink.link(name=ifname)
        if link is not None and link.kind == "macvtap":
            tap = own_node(link, self.macvtaps.dev_dir, self.macvtaps.sysfs)
            if tap is None:
                raise AllocationError(
                    f"{dev_id}: /dev/tap{link.index} is not the device of its macvtap {ifname}"
                )
            if index is not None and index != link.index:
                raise AllocationError(
                    f"{dev_id}: its macvtap {ifname} was made again as /dev/tap{link.index}, "
                    f"but the container was given /dev/tap{index}: re-create the pod"
                )
            self.records.set(dev_id, link.index)
            return f"{dev_id}: {tap.path} is {ifname}'s"
        if index is None:
            return f"{dev_id}: no record of its tap and no macvtap here: nothing to check"
        path = node_path(index, self.macvtaps.dev_dir)
        node = node_id(path)  # one look at the path for every case below
        if self.records.moved(dev_id) and node is not None:
            moved_node = self.records.node(dev_id)
            if moved_node is not None and node != moved_node:
                raise AllocationError(
                    f"{dev_id}: its macvtap moved into another namespace and {path} has been "
                    "made again since, for another device: the container would get someone "
                    "else's tap; re-create the pod"
                )
            return f"{dev_id}: {path} moved with its macvtap into another namespace (a pod's)"
        if node is None:
            lower = self.lower()
            tap = self.macvtaps.create(dev_id, ifname, lower, self.resource.mode, index=index)
            return f"{dev_id}: its macvtap was gone; made it again at {tap.path}"
        raise AllocationError(
            f"{dev_id}: its macvtap is gone and {path} is now another device's: "
            "the container would get someone else's tap; re-create the pod"
        )

    def gone(self, link: Link) -> None:
        """One of the plugin-numbered macvtaps left our namespace (link watcher)."""
        dev_id = self._devices.get(link.name)
        if dev_id is None or self.records.index(dev_id) != link.index:
            return
        moved = link.new_netnsid is not None
        node = None
        if moved and link.new_index in (None, link.index):
            # its node as the kernel made it again (new minor) in registering the
            # macvtap in its new namespace, during the move that sent this event
            node = node_id(node_path(link.index, self.macvtaps.dev_dir))
        self.records.set(dev_id, link.index, moved=moved, node=node)
        log.info(
            "%s (%s) %s",
            dev_id,
            link.name,
            "moved into another network namespace" if moved else "was deleted",
        )

    def _mark_used(self, device_ids: Sequence[str]) -> None:
        now = self._clock()
        for dev_id in device_ids:
            if dev_id in self._ids:
                self._used[dev_id] = now

    def used(self) -> dict[str, float]:
        """Device ID -> ``clock()`` of its last Allocate or PreStartContainer.

        The sweep starts no clock before it: the kubelet lists a pod's devices
        only after Allocate has returned.
        """
        return self._used.copy()

    def is_own(self, link: Link) -> str | None:
        """The device ID whose macvtap ``link`` is, else None.

        Its name is a device's, it is a macvtap, and its lower link is ours (in
        this namespace). Any mode: one left from before the resource's mode
        changed is this resource's leak all the same.
        """
        dev_id = self._devices.get(link.name)
        if dev_id is None or link.kind != "macvtap" or link.link_netnsid is not None:
            return None
        lower = self._lower.current()
        if lower is None or link.lower_index != lower.index:
            return None
        return dev_id

    def sweep(self, link: Link, dev_id: str, not_used_since: float | None = None) -> bool:
        """Delete ``dev_id``'s macvtap ``link``; True if deleted.

        Under the allocator's lock, so never during an Allocate. Nothing is
        deleted if the macvtap changed since ``link`` was read, or if the device
        was allocated or pre-started at or after ``not_used_since`` (the
        kubelet's answer the sweep acted on may predate it). The device's tap
        record goes with it: an Allocate makes a new macvtap.
        """
        with self._lock:
            if not_used_since is not None and self._used.get(dev_id, -math.inf) >= not_used_since:
                return False
            current = self.macvtaps.netlink.link(name=link.name)
            if current is None or current.index != link.index or self.is_own(current) != dev_id:
                return False
            # Forgotten first, so that the link watcher, seeing the macvtap go, does not
            # report it as "deleted" as it would one deleted by someone else.
            index, moved = self.records.index(dev_id), self.records.moved(dev_id)
            node = self.records.node(dev_id)
            self.records.forget(dev_id)
            try:
                return self.macvtaps.delete(current)
            except BaseException:
                if index is not None:
                    self.records.set(dev_id, index, moved, node)
                raise

    def _roll_back(self, made: Sequence[Tap]) -> None:
        for tap in made:
            try:
                self.macvtaps.remove(tap.ifname)
                log.info("rolled back %s", tap.ifname)
            except MacvtapdpError as err:
                log.error("could not roll back %s: %s", tap.ifname, err)
