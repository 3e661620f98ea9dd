"""Health of the lower link, driven by netlink link events (no polling).

Devices must turn Unhealthy within 100 ms of the lower link going down or
away, and Healthy again within 250 ms of it coming back, possibly as a new
link with the same name (new ifindex). A thread blocks in select() on the
link-event queue and reports each change of state within about a millisecond.
The link is followed by name, as the configuration names it. A link enslaved
to a bridge, bond, team or Open vSwitch is unusable (the kernel refuses a
macvtap on it: EBUSY), so it counts as unhealthy too.

The same thread sees this plugin's macvtaps leave the namespace: they are
numbered from ``bpf.HIGH_INDEX``, and the kernel filter passes their
RTM_DELLINK, which says whether the macvtap was deleted or moved into another
namespace (a pod's, by the macvtap CNI). ``on_gone`` hears of each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

from macvtapdp.errors import EventsLost, MacvtapdpError
from macvtapdp.linux.bpf import HIGH_INDEX
from macvtapdp.linux.link import IFF_DORMANT, IFF_LOWER_UP, IFF_RUNNING, IFF_UP, Link
from macvtapdp.linux.linkevents import NEWLINK, LinkEvents
from macvtapdp.linux.netlink import Netlink

log = logging.getLogger(__name__)

IFF_PROMISC, IFF_SLAVE = 0x100, 0x800
# What the kernel filter compares: health, and the flags that enslaving sets
FOLLOWED_FLAGS = IFF_UP | IFF_RUNNING | IFF_LOWER_UP | IFF_DORMANT | IFF_PROMISC | IFF_SLAVE
_RETRY_DELAY = 0.5  # after an unexpected error, before subscribing again
_STOP_TIMEOUT = 2.0  # only reached if a callback blocks
_FREE_MASTERS = frozenset({"vrf"})  # a VRF leaves its ports' receive path alone
_UNFILTERED = object()


@dataclass(frozen=True)
class LinkState:
    """The lower link as far as the devices' health goes; ``link`` is the last message seen."""

    link: Link | None = None

    @property
    def present(self) -> bool:
        return self.link is not None

    @property
    def enslaved(self) -> bool:
        link = self.link
        return (
            link is not None
            and link.master_index is not None
            and (link.slave_kind not in _FREE_MASTERS)
        )

    @property
    def up(self) -> bool:
        """The link itself: there, administratively up, with a carrier (enslaved or not)."""
        link = self.link
        return link is not None and link.admin_up and link.oper_ok

    @property
    def healthy(self) -> bool:
        return self.up and not self.enslaved

    @property
    def key(self) -> tuple[int, int, int | None, int | None] | None:
        """What a change of must be reported."""
        link = self.link
        if link is None:
            return None
        return (link.index, link.flags & FOLLOWED_FLAGS, link.txqlen, link.master_index)

    def describe(self) -> str:
        """A few words for logs and status: "up", "down (admin)", "missing", ..."""
        link = self.link
        if link is None:
            return "missing"
        if self.enslaved:
            return f"a port of a {link.slave_kind or 'master'} (index {link.master_index}): busy"
        if not link.admin_up:
            return "down (admin)"
        if not link.oper_ok:
            return f"no carrier (operstate {link.operstate.lower()})"
        return "up"


class LinkWatcher:
    """Calls ``on_change(state)`` once at start() and then on every change of state.

    start() subscribes on the calling thread's network namespace (the netlink
    threads inherit it). Callbacks run on the watcher thread and must not block.
    """

    def __init__(
        self,
        name: str,
        netlink: Netlink,
        on_change: Callable[[LinkState], None],
        on_gone: Callable[[Link], None] | None = None,
        *,
        kernel_filter: bool = True,
    ) -> None:
        self.name = name
        self._kernel_filter = kernel_filter
        self._netlink = netlink
        self._on_change = on_change
        self._on_gone = on_gone
        self._state = LinkState()
        self._thread: threading.Thread | None = None
        self._wake: int | None = None  # write end of the self-pipe that stops the thread
        self._filtered: object = _UNFILTERED
        self._event_size = 0  # length of the last event of the followed link
        self._report_lock = threading.Lock()

    @property
    def state(self) -> LinkState:
        return self._state

    def refresh(self) -> LinkState:
        """Read the link now (an Allocate that failed may know better than the last event)."""
        self._report(self._read())
        return self._state

    def start(self) -> None:
        """Subscribe to link events, report the current state, then follow it."""
        if self._thread is not None:
            raise RuntimeError(f"the watcher of {self.name} is already running")
        with contextlib.ExitStack() as undo:
            events = undo.enter_context(LinkEvents())  # first: no later event can be missed
            stop_fd, wake_fd = os.pipe()
            undo.callback(os.close, stop_fd)
            undo.callback(os.close, wake_fd)
            self._report(self._read(), initial=True)
            self._filter(events)
            undo.pop_all()
        self._wake = wake_fd
        self._thread = threading.Thread(
            target=self._run, args=(events, stop_fd), name=f"linkwatch-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and release its subscription; returns as soon as it has ended."""
        thread, self._thread = self._thread, None
        if thread is None or self._wake is None:
            return
        os.write(self._wake, b"\0")
        thread.join(_STOP_TIMEOUT)
        os.close(self._wake)
        self._wake = None
        if thread.is_alive():
            log.warning("link watcher of %s did not stop: a callback is blocking", self.name)

    def _read(self) -> LinkState:
        return LinkState(self._netlink.link(name=self.name))

    def _run(self, events: LinkEvents | None, stop_fd: int) -> None:
        """Follow the link until stopped; on any error, log, wait, subscribe again."""
        try:
            while True:
                try:
                    if events is None:
                        events = LinkEvents()
                        self._filtered = _UNFILTERED
                    self._follow(events, stop_fd)
                    return
                except (MacvtapdpError, OSError) as err:
                    log.error(
                        "watching link %s failed (%s): subscribing again in %g s",
                        self.name,
                        err,
                        _RETRY_DELAY,
                    )
                    if events is not None:
                        events.close()
                        events = None
                if select.select([stop_fd], [], [], _RETRY_DELAY)[0]:
                    return
        finally:
            if events is not None:
                events.close()
            os.close(stop_fd)

    def _follow(self, events: LinkEvents, stop_fd: int) -> None:
        """Re-read the state (events before the subscription are not queued), then follow."""
        self._report(self._read())
        self._filter(events)
        while True:
            ready = select.select([events.fileno(), stop_fd], [], [])[0]
            if stop_fd in ready:
                return
            try:
                batch = events.read()
            except EventsLost:
                log.warning("link events were dropped: re-reading link %s", self.name)
                self._report(self._read())
                self._filter(events)
                continue
            for kind, link in batch:
                if kind != NEWLINK and link.index >= HIGH_INDEX and link.name != self.name:
                    self._gone(link)
                else:
                    self._report(self._next(kind, link))
            self._filter(events)

    def _filter(self, events: LinkEvents) -> None:
        """Have the kernel pass only events that change our link; re-read after each change.

        Until the filter is set for the new state, an event it drops (a rename
        of a new index, flags back to the old value) can be missed: re-reading
        the link catches it.
        """
        if not self._kernel_filter:
            return
        while self._filtered != self._filter_key():
            self._filtered = key = self._filter_key()
            state = (key[1], key[2], key[3]) if key else None
            events.only(
                self.name,
                key[0] if key else None,
                state,
                flags_mask=FOLLOWED_FLAGS,
                high_deletions=self._on_gone is not None,
            )
            self._report(self._read())

    def _filter_key(self) -> tuple[int, int, int | None, int] | None:
        """What the kernel filter is set for: index, flags and txqlen, and the event size.

        The size is the last *event's*: a request's answer may be longer or
        shorter than the kernel's notifications.
        """
        link = self._state.link
        if link is None:
            return None
        return (link.index, link.flags & FOLLOWED_FLAGS, link.txqlen, self._event_size)

    def _next(self, kind: str, link: Link) -> LinkState:
        """The state after one event; links are followed by name, across new ifindexes."""
        if kind == NEWLINK and link.name == self.name:
            self._event_size = link.size
            return LinkState(link)
        current = self._state.link
        if current is not None and link.index == current.index:  # deleted, or renamed away
            return LinkState()
        return self._state

    def _gone(self, link: Link) -> None:
        if self._on_gone is None:
            return
        try:
            self._on_gone(link)
        except Exception as err:
            log.error("handling the removal of %s failed: %r", link.name, err)

    def _report(self, state: LinkState, *, initial: bool = False) -> None:
        with self._report_lock:
            old = self._state
            self._state = state  # the newest message, even if nothing we report changed
            if initial or state.key != old.key or state.describe() != old.describe():
                try:
                    self._on_change(state)
                except Exception as err:
                    log.error(
                        "reporting link %s as %s failed: %r", self.name, state.describe(), err
                    )
