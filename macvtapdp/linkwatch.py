"""Health of the lower link, driven by netlink link events (no polling).

Devices must turn Unhealthy within 100 ms of the lower link going down or
away, and Healthy again within 250 ms of it coming back, possibly as a new
link with the same name (new ifindex). A thread blocks in select() on a
link-event socket and reports each change of state within about a millisecond.
The link is followed by name, as the configuration names it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

from macvtapdp.rtnl import (
    IF_OPER_UNKNOWN,
    RTM_NEWLINK,
    STATE_FLAGS,
    EventsLost,
    Link,
    LinkMonitor,
    Rtnl,
)

log = logging.getLogger(__name__)

_OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
_RETRY_DELAY = 0.5  # after an unexpected socket error, before subscribing again
_STOP_TIMEOUT = 2.0  # only reached if on_change blocks
_UNFILTERED = object()


@dataclass(frozen=True)
class LinkState:
    """What the devices' health depends on; ``operstate`` only feeds describe().

    ``flags`` are the link's state flags (rtnl.STATE_FLAGS): the kernel filter
    passes only events that change them (or delete or rename the link).
    """

    present: bool
    index: int | None = None
    admin_up: bool = False
    oper_ok: bool = False
    operstate: int = IF_OPER_UNKNOWN
    flags: int = 0

    @classmethod
    def of(cls, link: Link | None) -> LinkState:
        if link is None:
            return cls(present=False)
        flags = link.flags & STATE_FLAGS
        return cls(True, link.index, link.admin_up, link.oper_ok, link.operstate, flags)

    @property
    def healthy(self) -> bool:
        return self.present and self.admin_up and self.oper_ok

    def describe(self) -> str:
        """A few words for logs: "up", "down (admin)", "no carrier (...)" or "missing"."""
        if not self.present:
            return "missing"
        if not self.admin_up:
            return "down (admin)"
        if not self.oper_ok:
            name = _OPERSTATES[self.operstate] if self.operstate < len(_OPERSTATES) else "?"
            return f"no carrier (operstate {name})"
        return "up"


class LinkWatcher:
    """Calls ``on_change(state)`` once at start() and then on every change of state.

    start() opens the sockets on the calling thread, so they (and the watcher
    thread, which inherits the caller's network namespace) live in the
    caller's namespace. on_change runs on the watcher thread and must not block.
    """

    def __init__(self, name: str, on_change: Callable[[LinkState], None]) -> None:
        self.name = name
        self._on_change = on_change
        self._state = LinkState(present=False)
        self._thread: threading.Thread | None = None
        self._wake: int | None = None  # write end of the self-pipe that stops the thread
        self._filtered: object = _UNFILTERED  # (index, flags) the kernel filter is set for

    @property
    def state(self) -> LinkState:
        return self._state

    def start(self) -> None:
        """Subscribe to link events, report the current state, then follow it."""
        if self._thread is not None:
            raise RuntimeError(f"the watcher of {self.name} is already running")
        with contextlib.ExitStack() as undo:
            monitor = undo.enter_context(LinkMonitor())  # first: no later event can be missed
            rtnl = undo.enter_context(Rtnl())
            stop_fd, wake_fd = os.pipe()
            undo.callback(os.close, stop_fd)
            undo.callback(os.close, wake_fd)
            self._report(LinkState.of(rtnl.link(name=self.name)), initial=True)
            self._filter(monitor, rtnl)
            undo.pop_all()
        self._wake = wake_fd
        self._thread = threading.Thread(
            target=self._run, args=(monitor, rtnl, stop_fd), name=f"linkwatch-{self.name}"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and release its sockets; returns as soon as it has ended."""
        thread, self._thread = self._thread, None
        if thread is None or self._wake is None:
            return
        os.write(self._wake, b"\0")
        thread.join(_STOP_TIMEOUT)
        os.close(self._wake)
        self._wake = None
        if thread.is_alive():
            log.warning("link watcher of %s did not stop: on_change is blocking", self.name)

    def _run(self, monitor: LinkMonitor | None, rtnl: Rtnl, stop_fd: int) -> None:
        """Follow the link until stopped; on any error, log, wait, subscribe again."""
        try:
            while True:
                try:
                    if monitor is None:
                        monitor = LinkMonitor()
                        self._filtered = _UNFILTERED
                    self._follow(monitor, rtnl, stop_fd)
                    return
                except Exception as err:
                    log.error(
                        "watching link %s failed (%r): subscribing again in %g s",
                        self.name,
                        err,
                        _RETRY_DELAY,
                    )
                    if monitor is not None:
                        monitor.close()
                        monitor = None
                if select.select([stop_fd], [], [], _RETRY_DELAY)[0]:
                    return
        finally:
            if monitor is not None:
                monitor.close()
            rtnl.close()
            os.close(stop_fd)

    def _follow(self, monitor: LinkMonitor, rtnl: Rtnl, stop_fd: int) -> None:
        """Re-read the state (events before the subscription are not queued), then follow."""
        self._report(LinkState.of(rtnl.link(name=self.name)))
        self._filter(monitor, rtnl)
        while True:
            ready = select.select([monitor.fileno(), stop_fd], [], [])[0]
            if stop_fd in ready:
                return
            try:
                events = monitor.read()
            except EventsLost:
                log.warning("link events were dropped: re-reading link %s", self.name)
                self._report(LinkState.of(rtnl.link(name=self.name)))
                self._filter(monitor, rtnl)
                continue
            for kind, link in events:
                self._report(self._next(kind, link))
            self._filter(monitor, rtnl)

    def _filter(self, monitor: LinkMonitor, rtnl: Rtnl) -> None:
        """Have the kernel pass only events that change our link; re-read after each change.

        Until the filter is set for the new index and flags, an event it drops
        (a rename of a new index, flags back to the old value) can be missed:
        re-reading the link catches it.
        """
        while self._filtered != (self._state.index, self._state.flags):
            self._filtered = (self._state.index, self._state.flags)
            monitor.only(self.name, self._state.index, self._state.flags)
            self._report(LinkState.of(rtnl.link(name=self.name)))

    def _next(self, kind: int, link: Link) -> LinkState:
        """The state after one event; links are followed by name, across new ifindexes."""
        if kind == RTM_NEWLINK and link.name == self.name:
            return LinkState.of(link)
        if self._state.present and link.index == self._state.index:  # deleted, or renamed away
            return LinkState(present=False)
        return self._state

    def _report(self, state: LinkState, *, initial: bool = False) -> None:
        if state == self._state and not initial:
            return
        self._state = state
        try:
            self._on_change(state)
        except Exception as err:
            log.error("on_change(%s) for link %s failed: %r", state, self.name, err)
