"""The sweep: delete this resource's macvtaps that no pod has held for a whole grace.

Device plugins get no Deallocate. A pod that uses ``/dev/tapN`` directly (a VM
on the tap) leaves its macvtap in our namespace when it goes, where it keeps
receiving copies of broadcast traffic (and a passthru one blocks the lower link
for every other device). The macvtap CNI's macvtaps move into the pod's
namespace and die with it: they are not in ours, so they are never seen here.

Each round asks the kubelet's PodResources API which of this resource's device
IDs active pods hold, then lists the links of our namespace. A macvtap that is
one of this resource's devices (its name, kind macvtap, on our lower link:
``Allocator.is_own``) and is not held starts a clock; one held again stops it.
Once a clock has run for the grace, the macvtap is deleted, under the
allocator's lock (``Allocator.sweep``), with one log line. The clock also never
starts before the device's last Allocate or PreStartContainer: the kubelet
records a pod's devices only after Allocate returns, and an Allocate that
reuses a leaked macvtap must not lose it to a clock started earlier.

Nothing is deleted on what is not known: while the API cannot be reached or
answers an error, the sweep is paused (logged once per transition, and the
state file's ``sweep`` field says so for ``status``), and every clock starts
again when it answers: a kubelet that just restarted may not list every pod
yet, and the grace then covers that too.

The period is a tenth of the grace, between 1 s and 30 s: a macvtap goes at
most a period after its grace, and a pause shows within a period. Rounds start
at a random moment and keep a little jitter, so resources started together do
not call at once: the kubelet limits PodResources to 100 calls a second with a
burst of 10, and one List per resource per period (a few a second at most for
a whole node) stays far below that.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from macvtapdp.config import Resource
from macvtapdp.errors import MacvtapdpError, Unreachable
from macvtapdp.linux.link import Link
from macvtapdp.plugin.allocator import Allocator
from macvtapdp.plugin.observe import Observer
from macvtapdp.settings import Plugin
from macvtapdp.statefile import StateFile

log = logging.getLogger(__name__)

MIN_PERIOD = 1.0
MAX_PERIOD = 30.0
FIRST_WITHIN = 5.0  # the first round, at a random moment within this (or the period)
JITTER = 0.1
STOP_TIMEOUT = 2.0
ACTIVE, STARTING, OFF = "active", "starting", "off"


def period(grace: float) -> float:
    """Seconds between rounds for ``grace``."""
    return min(MAX_PERIOD, max(MIN_PERIOD, grace / 10))


@dataclass(frozen=True)
class Decision:
    """What one round deletes, and the clocks the next round starts from."""

    delete: tuple[str, ...] = ()
    unheld_since: dict[str, float] = field(default_factory=dict)


def decide(
    held: Collection[str],
    own: Collection[str],
    unheld_since: Mapping[str, float],
    now: float,
    grace: float,
    used: Mapping[str, float] | None = None,
) -> Decision:
    """Which of the devices with a macvtap of their own (``own``) to delete now.

    ``held``: the device IDs pods hold; ``unheld_since``: when each device was
    first seen not held (the last round's clocks); ``used``: when each was last
    allocated or pre-started. A device with no macvtap, or held, loses its clock.
    """
    used = used or {}
    clocks: dict[str, float] = {}
    delete: list[str] = []
    for dev_id in sorted(own):
        if dev_id in held:
            continue
        since = max(unheld_since.get(dev_id, now), used.get(dev_id, -math.inf))
        clocks[dev_id] = since
        if now - since >= grace:
            delete.append(dev_id)
    return Decision(tuple(delete), clocks)


class Lister(Protocol):
    """Which devices pods hold (``podresources.PodResources``)."""

    def held(self, resource_name: str) -> frozenset[str]: ...

    def cancel(self) -> None: ...


class Sweep:
    """One resource's sweep; ``start`` runs rounds in a thread, ``run_once`` runs one here."""

    def __init__(
        self,
        resource: Resource,
        allocator: Allocator,
        lister: Lister,
        state: StateFile,
        observer: Observer,
        grace: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resource = resource
        self.allocator = allocator
        self.lister = lister
        self.state = state
        self.observer = observer
        self.grace = grace
        self.period = period(grace)
        self._clock = clock
        self._since: dict[str, float] = {}
        self._status = STARTING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        """``starting``, ``active`` or ``paused: <why>``, as the state file has it."""
        return self._status

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self.state.update(sweep=self._status)
        self._thread = threading.Thread(target=self._run, name="sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread promptly: a List in flight is cancelled, no deletion starts."""
        self._stop.set()
        self.lister.cancel()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)

    def _run(self) -> None:
        wait = random.uniform(0, min(self.period, FIRST_WITHIN))
        while not self._stop.wait(wait):
            try:
                self.run_once()
            except Exception as err:  # a bug must pause the sweep, not end it unseen
                log.error("sweep round failed", exc_info=True)
                self._pause(f"internal error: {type(err).__name__}")
            wait = self.period * random.uniform(1 - JITTER, 1 + JITTER)

    def run_once(self) -> int:
        """One round: ask, look, delete; the number of macvtaps deleted."""
        listed_at = self._clock()
        try:
            held = self.lister.held(self.resource.resource_name)
            links = self.allocator.macvtaps.netlink.macvtaps()
        except Unreachable as err:
            if not self._stop.is_set():  # a List cancelled by stop() is no news
                self._pause(str(err))
            return 0
        except MacvtapdpError as err:
            self._pause(f"cannot list macvtaps: {err}")
            return 0
        now = self._clock()
        self._resume()
        own: dict[str, Link] = {}
        for link in links:
            dev_id = self.allocator.is_own(link)
            if dev_id is not None:
                own[dev_id] = link
        decision = decide(held, own, self._since, now, self.grace, self.allocator.used())
        self._since = decision.unheld_since
        swept = 0
        for dev_id in decision.delete:
            if self._stop.is_set():
                break
            link = own[dev_id]
            try:
                deleted = self.allocator.sweep(link, dev_id, not_used_since=listed_at)
            except MacvtapdpError as err:
                log.warning("sweep: cannot delete %s (%s): %s", link.name, dev_id, err)
                continue
            since = self._since.pop(dev_id, now)
            if deleted:
                swept += 1
                log.info(
                    "swept %s (%s, /dev/tap%d): no pod has held it in %.0f s",
                    dev_id,
                    link.name,
                    link.index,
                    now - since,
                )
        if swept:
            self.observer.swept(swept)
        return swept

    def _pause(self, why: str) -> None:
        self._since.clear()
        status = f"paused: {why}"
        if status == self._status:
            return
        if not self._status.startswith("paused"):
            log.warning(
                "sweep paused: %s; nothing is deleted until the kubelet's PodResources API answers",
                why,
            )
        self._status = status
        self.state.update(sweep=status)

    def _resume(self) -> None:
        if self._status == ACTIVE:
            return
        log.info("sweep active: a macvtap no pod has held for %g s goes", self.grace)
        self._status = ACTIVE
        self.state.update(sweep=ACTIVE)


def start(
    resource: Resource,
    plugin: Plugin,
    allocator: Allocator,
    state: StateFile,
    observer: Observer,
) -> Sweep | None:
    """The resource process's sweep, started; None (and ``off`` in the state file) at grace 0."""
    if plugin.sweep_grace <= 0:
        log.info("sweep off: leaked macvtaps stay (--sweep-grace is 0)")
        state.update(sweep=OFF)
        return None
    from macvtapdp.plugin.podresources import PodResources

    sweep = Sweep(
        resource, allocator, PodResources(plugin.pod_resources_socket), state, observer,
        plugin.sweep_grace,
    )  # fmt: skip
    log.info(
        "sweep: every %g s, asking %s which devices pods hold",
        sweep.period,
        plugin.pod_resources_socket,
    )
    sweep.start()
    return sweep
