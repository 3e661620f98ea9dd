"""``python -m macvtapdp.node.reconcile``: keep the resource programs equal to what is wanted.

A supervised program, present in discovery mode and when the configuration
comes from a file. Each pass works out the wanted resources (``wanted``),
writes their program files (``programs``) and has supervisord apply them
(``apply``). This module is the loop that decides when a pass runs:

- link events (netlink), in discovery mode: a link created, deleted, renamed
  or (un)enslaved;
- changes in the configuration file's directory, and in the directory its
  symlinks resolve to (inotify: a file written, created, moved in or deleted;
  a ConfigMap volume swaps its ``..data`` symlink); the file is read through its
  path, so the swap is followed;
- both debounced (``DEBOUNCE``, at most ``DEBOUNCE_MAX`` after the first event),
  so one pass follows a burst;
- every ``SAFETY_INTERVAL`` seconds regardless (a missed event, a program
  removed by hand); when a discovery grace period ends; and after a failed
  pass, with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from macvtapdp.config import Resource
from macvtapdp.errors import EventsLost, MacvtapdpError, RenderError
from macvtapdp.linux.inotify import FILE_CHANGES, DirWatch
from macvtapdp.linux.linkevents import LinkEvents
from macvtapdp.linux.netlink import Netlink
from macvtapdp.node import apply, discovery, programs
from macvtapdp.node.control import Control, Supervisor
from macvtapdp.node.wanted import WantedResources
from macvtapdp.rundir import Layout
from macvtapdp.settings import Node

log = logging.getLogger("macvtapdp.reconcile")

DEBOUNCE = 0.1  # quiet time after an event before a pass
DEBOUNCE_MAX = 0.5  # a pass at most this long after the first event of a burst
SAFETY_INTERVAL = 60.0  # a pass at least this often
RETRY_FIRST = 0.5  # after a failed pass (supervisord unreachable...), doubling
RETRY_MAX = 10.0


class Stopped(BaseException):
    """SIGTERM during a pass: give up the pass and exit (not an Exception: nothing swallows it)."""


class Reconciler:
    """One pass: what is wanted, written as program files, applied by supervisord."""

    def __init__(
        self,
        layout: Layout,
        node: Node,
        wanted: WantedResources,
        supervisor: Control,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.node = node
        self.wanted = wanted
        self.supervisor = supervisor
        self._clock = clock
        self._live: dict[str, Resource | None] = programs.current(layout)  # as last applied

    def reconcile(self, *, file_event: bool = False) -> float | None:
        """One pass; returns when a grace period ends (a pass is due then), or None.

        Raises MacvtapdpError when the kernel or supervisord fails: the caller
        retries. With an invalid configuration the files stay as they are, but
        are still applied: an earlier pass may not have finished.
        """
        wanted = self.wanted.wanted(self._clock(), programs.current(self.layout))
        if wanted.resources is not None:
            try:
                programs.write(self.layout, self.node, wanted.resources)
            except RenderError as err:  # validated names cannot get here; never crash-loop
                log.error("cannot write the resources' programs; keeping the current ones: %s", err)
        current = programs.current(self.layout)
        target = {n: r for n, r in current.items() if r is not None}
        done = apply.apply(self.supervisor, self._live, target, wanted.reasons)
        for line in done:
            log.info("%s", line)
        self._live = dict(current)
        if file_event and not done and wanted.resources is not None and self.wanted.unchanged:
            log.info("configuration unchanged")
        return wanted.wake


class FileWatches:
    """inotify on the configuration file's directory, and on its target's if it is a symlink.

    The file's own directory sees a ConfigMap volume's ``..data`` swap and any
    file replaced or written there; the directory the symlinks resolve to sees
    a target edited in place (a symlink to a file elsewhere). ``follow``
    re-resolves after each change, so the second watch moves with the target.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._watches: dict[str, DirWatch] = {}
        self.follow()

    def _dirs(self) -> set[str]:
        if self.path is None:
            return set()
        return {os.path.dirname(self.path), os.path.dirname(os.path.realpath(self.path))}

    def follow(self) -> None:
        """Watch the directories the file is reached through now."""
        wanted = self._dirs()
        for gone in set(self._watches) - wanted:
            self._watches.pop(gone).close()
        for new in wanted - set(self._watches):
            try:
                self._watches[new] = DirWatch(new, FILE_CHANGES)
            except OSError as err:  # e.g. out of inotify watches: the safety pass remains
                log.warning(
                    "cannot watch %s (%s): changes are seen within %g s", new, err, SAFETY_INTERVAL
                )

    def filenos(self) -> list[int]:
        return [w.fileno() for w in self._watches.values()]

    def changed(self, ready: Sequence[int]) -> bool:
        """Whether a ready watch reported an event (reads them all)."""
        found = False
        for watch in self._watches.values():
            if watch.fileno() in ready and watch.read():
                found = True
        return found

    def close(self) -> None:
        for watch in self._watches.values():
            watch.close()
        self._watches.clear()


class StopSignal:
    """SIGTERM/SIGINT: wakes the loop's select(); interrupts a pass in progress."""

    def __init__(self) -> None:
        self.requested = False
        self._busy = False
        self._installed = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        # a signal the kernel hands to another thread must still wake the main one's select
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._installed = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")
        if self._busy:  # a pass may wait seconds on supervisord: give it up
            raise Stopped()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.requested:
            raise Stopped()
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def close(self) -> None:
        if self._installed:
            signal.set_wakeup_fd(-1)
        os.close(self._r)
        os.close(self._w)


class Schedule:
    """When the next pass is due: the earliest of a few named deadlines."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._at: dict[str, float] = {}
        self._burst: float | None = None

    def set(self, name: str, at: float | None) -> None:
        if at is None:
            self._at.pop(name, None)
        else:
            self._at[name] = at

    def event(self) -> None:
        """An event worth a pass: soon, debounced within its burst."""
        now = self._clock()
        self._burst = now if self._burst is None else self._burst
        self._at["event"] = min(now + DEBOUNCE, self._burst + DEBOUNCE_MAX)

    def timeout(self) -> float:
        return max(0.0, min(self._at.values()) - self._clock())

    def due(self) -> bool:
        return min(self._at.values()) <= self._clock()

    def passed(self) -> None:
        """A pass is starting: only the safety deadline stays, pushed back."""
        self._at = {"safety": self._clock() + SAFETY_INTERVAL}
        self._burst = None


def run(reconciler: Reconciler, events: LinkEvents, watches: FileWatches, stop: StopSignal) -> None:
    """Pass at once, then on events and deadlines, until SIGTERM/SIGINT."""
    clock = time.monotonic
    schedule = Schedule(clock)
    schedule.set("first", clock())
    retry_delay = RETRY_FIRST
    file_event = False
    while not stop.requested:
        sources = [events.fileno(), stop.fileno(), *watches.filenos()]
        ready = select.select(sources, [], [], schedule.timeout())[0]
        if stop.requested:
            return
        if events.fileno() in ready:
            try:
                batch = events.read()
                relevant = any(reconciler.wanted.relevant(kind, link) for kind, link in batch)
            except EventsLost:
                log.warning("link events were dropped: listing links again")
                relevant = True
            if relevant and reconciler.wanted.discovering:
                schedule.event()
        if watches.changed(ready):
            file_event = True
            schedule.event()
        if not schedule.due():
            continue
        schedule.passed()
        watches.follow()
        try:
            with stop.interruptible():
                schedule.set("grace", reconciler.reconcile(file_event=file_event))
            file_event = False
            retry_delay = RETRY_FIRST
        except MacvtapdpError as err:
            log.warning("pass failed (%s); trying again in %g s", err, retry_delay)
            schedule.set("retry", clock() + retry_delay)
            retry_delay = min(retry_delay * 2, RETRY_MAX)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reconcile`` program; 0 on SIGTERM/SIGINT."""
    from macvtapdp import logs, settings
    from macvtapdp.linux import process

    try:
        node = settings.from_argv(Node, sys.argv[1:] if argv is None else argv)
        filters = discovery.Filters.of(node.discovery)
    except MacvtapdpError as err:
        print(f"macvtapdp: error: {err}", file=sys.stderr)
        return 2
    logs.configure("reconcile")
    process.die_with_parent()
    layout = Layout(node.plugin.run_dir)
    grace = node.discovery.discover_grace
    netlink = Netlink()
    wanted = WantedResources(
        node.plugin.plugin_dir,
        config_file=node.config_file,
        filters=filters,
        grace=grace,
        links=netlink.links,
    )
    stop = StopSignal()
    stop.install()
    if node.config_file is not None:
        log.info("following configuration file %s", node.config_file)
    else:
        log.info(
            "discovery mode (%s): following the links of this node; a resource whose link "
            "is gone is removed after %g s",
            filters.describe(),
            grace,
        )
    events = LinkEvents()  # before the first scan: no later change is missed
    watches = FileWatches(node.config_file)
    try:
        with Supervisor(layout.server_url) as supervisor:
            run(Reconciler(layout, node, wanted, supervisor), events, watches, stop)
    except Stopped:
        pass
    finally:
        events.close()
        watches.close()
        netlink.close()
        stop.close()
    log.info("stopped")
    logs.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
