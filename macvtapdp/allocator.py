"""Allocate: one macvtap per device, all or nothing.

Requests are serialised (one lock per process): the kubelet sends them one at a
time anyway, and a lock makes "never two interfaces for one device" and the
rollback of a part-way failure simple to see. Each device's interface name is
the one the macvtap CNI derives from its ID, so the CNI finds it in the pod.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from macvtapdp import macvtap, naming
from macvtapdp.config import Resource
from macvtapdp.errors import AllocationError, LinkMissingError
from macvtapdp.rtnl import Rtnl

log = logging.getLogger(__name__)


class Allocator:
    """Makes the macvtaps of ``resource``'s devices on its lower link."""

    def __init__(self, resource: Resource, rtnl: Rtnl) -> None:
        self.resource = resource
        self.rtnl = rtnl
        self._lock = threading.Lock()

    def allocate(self, device_ids: Sequence[str]) -> list[str]:
        """Ensure each device's macvtap exists and is up; return its /dev/tapN paths.

        On any failure the macvtaps created by this call are deleted again
        (ones that already existed stay: an earlier Allocate handed them out).
        """
        res = self.resource
        made: list[macvtap.Tap] = []
        paths: list[str] = []
        with self._lock:
            try:
                for dev_id in device_ids:
                    started = time.perf_counter()
                    ifname = naming.interface_name(dev_id)
                    try:
                        tap, created = macvtap.ensure(self.rtnl, ifname, res.master, res.mode)
                    except (LinkMissingError, AllocationError):
                        raise
                    except OSError as err:
                        raise AllocationError(
                            f"cannot make macvtap {ifname} for {dev_id} on {res.master}: {err}"
                        ) from err
                    if created:
                        made.append(tap)
                    paths.append(tap.path)
                    log.info(
                        "allocated %s: %s %s (%s in %.2f ms)",
                        dev_id,
                        ifname,
                        tap.path,
                        "created" if created else "reused",
                        (time.perf_counter() - started) * 1000,
                    )
            except BaseException:
                self._roll_back(made)
                raise
        return paths

    def _roll_back(self, made: Sequence[macvtap.Tap]) -> None:
        for tap in made:
            try:
                macvtap.remove(self.rtnl, tap.ifname)
                log.info("rolled back %s", tap.ifname)
            except OSError as err:
                log.error("could not roll back %s: %s", tap.ifname, err)
