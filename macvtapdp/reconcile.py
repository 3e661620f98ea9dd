"""``macvtapdp reconcile``: keep the resource programs equal to what is wanted.

A supervised program, present in discovery mode and when the configuration
comes from a file. Each pass computes the wanted resources (the links
discovery offers, or the file's resources), writes their program files
(``programs``), and has supervisord apply them exactly as ``supervisorctl
update`` does: ``reloadConfig()`` names the groups added, changed and removed;
removed ones are stopped and removed, changed ones stopped, removed and added
again (a restart with the new settings), added ones added (and so started).
Each program's command line carries all its settings, so an unchanged
resource's program is byte-identical: supervisord reports it unchanged and its
process, socket and kubelet stream are left alone. Only ``resource-*`` groups
are touched.

When a pass runs:

- link events (netlink), in discovery mode: a link created, deleted, renamed
  or (un)enslaved; bursts are debounced (``DEBOUNCE``, at most ``DEBOUNCE_MAX``
  after the first event), so one pass follows a burst;
- changes in the configuration file's directory, and in the directory its
  symlinks resolve to (inotify: a file written, created, moved in or deleted;
  a ConfigMap volume swaps its ``..data`` symlink), debounced the same way; the
  file is read through its path, so the swap is followed;
- every ``SAFETY_INTERVAL`` seconds regardless (a missed event, a program
  removed by hand);
- when a discovery grace period ends, and after a failed pass (with backoff).

A configuration file that fails validation changes nothing: every problem is
logged, one line each (once per distinct set of problems), and the current
programs keep running. In discovery mode a link that disappears keeps its
resource for ``--discover-grace`` seconds (default 5): its serve process
reports the devices Unhealthy at once, and a link that comes back within the
grace (a driver reload, a bond re-created) keeps its process and its kubelet
stream. After the grace the program is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from macvtapdp import config, control, discovery, logs, programs
from macvtapdp.config import Resource
from macvtapdp.dirwatch import FILE_CHANGES, DirWatch
from macvtapdp.errors import ConfigError, RenderError
from macvtapdp.rtnl import RTM_DELLINK, EventsLost, Link, LinkMonitor, Rtnl
from macvtapdp.supervisord import Layout, resource_of

log = logging.getLogger("macvtapdp.reconcile")

DEBOUNCE = 0.2  # quiet time after an event before a pass
DEBOUNCE_MAX = 1.0  # a pass at most this long after the first event of a burst
SAFETY_INTERVAL = 60.0  # a pass at least this often
RETRY_FIRST = 0.5  # after a failed pass (supervisord unreachable...), doubling
RETRY_MAX = 10.0

# supervisor.xmlrpc.Faults
BAD_NAME, ALREADY_ADDED = 10, 90

Connect = Callable[[], contextlib.AbstractContextManager[Any]]


class Stopped(BaseException):
    """SIGTERM during a pass: give up the pass and exit (not an Exception: nothing swallows it)."""


def describe(res: Resource) -> str:
    return f"lower link {res.master}, mode {res.mode.value}, {res.capacity} devices"


def difference(old: Resource | None, new: Resource | None) -> str:
    """``mode bridge -> vepa, capacity 100 -> 10``; empty if unknown or equal."""
    if old is None or new is None:
        return ""
    changes = [
        f"{label} {a} -> {b}"
        for label, a, b in (
            ("lower link", old.master, new.master),
            ("mode", old.mode.value, new.mode.value),
            ("capacity", old.capacity, new.capacity),
        )
        if a != b
    ]
    return ", ".join(changes)


def _tolerate(call: Callable[[], object], *codes: int) -> None:
    try:
        call()
    except xmlrpc.client.Fault as fault:
        if fault.faultCode not in codes:
            raise


def apply(
    rpc: Any,
    before: Mapping[str, Resource | None],
    after: Mapping[str, Resource],
    reasons: Mapping[str, str] | None = None,
) -> list[str]:
    """Have supervisord run the program files now on disk; the log lines of what it did.

    ``before`` and ``after`` only feed the log lines. Raises OSError or
    xmlrpc.client.Error if supervisord cannot be reached or refuses; a later
    call finishes the job (``reloadConfig`` compares with what is running).
    """
    reasons = reasons or {}
    [[added, changed, removed]] = rpc.reloadConfig()
    done: list[str] = []

    def ours(groups: Sequence[str]) -> list[str]:
        return sorted(g for g in groups if resource_of(g) is not None)

    def stop_and_remove(group: str) -> None:
        _tolerate(lambda: rpc.stopProcessGroup(group, True), BAD_NAME)
        _tolerate(lambda: rpc.removeProcessGroup(group), BAD_NAME)

    def add(group: str) -> None:
        _tolerate(lambda: rpc.addProcessGroup(group), ALREADY_ADDED)

    for group in ours(removed):
        stop_and_remove(group)
        name = str(resource_of(group))
        why = reasons.get(name)
        done.append(f"removed resource {name}" + (f" ({why})" if why else ""))
    for group in ours(changed):
        stop_and_remove(group)
        add(group)
        name = str(resource_of(group))
        diff = difference(before.get(name), after.get(name))
        done.append(f"restarted resource {name}" + (f": {diff}" if diff else ""))
    for group in ours(added):
        add(group)
        name = str(resource_of(group))
        new = after.get(name)
        done.append(f"added resource {name}" + (f": {describe(new)}" if new else ""))
    return done


@dataclass
class Wanted:
    """The outcome of working out what should run."""

    resources: list[Resource] | None  # None: invalid configuration, keep what runs
    wake: float | None = None  # a grace period ends then: look again
    reasons: dict[str, str] = field(default_factory=dict)  # why a resource goes


def _key(link: Link) -> tuple[str, int | None, str | None]:
    return (link.name, link.master_index, link.kind)


class Reconciler:
    """Works out the wanted resources and applies them; ``run`` is its event loop."""

    def __init__(
        self,
        layout: Layout,
        plugin_dir: str,
        base: Sequence[str],
        *,
        config_file: str | None = None,
        filters: discovery.Filters | None = None,
        grace: float = discovery.DEFAULT_GRACE,
        connect: Connect | None = None,
        links: Callable[[], list[Link]] | None = None,
        facts_of: discovery.FactsOf = discovery.sysfs_facts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.plugin_dir = plugin_dir
        self.base = list(base)
        self.config_file = config_file
        self.filters = filters or discovery.Filters()
        self.grace = grace
        self._connect = connect or (lambda: control.connect(layout.server_url))
        self._links = links
        self._facts_of = facts_of
        self._clock = clock
        self.discovering = config_file is None
        self._live: dict[str, Resource | None] = programs.current(layout)  # as last applied
        self._missing_since: dict[str, float] = {}
        self._notes: dict[str, str] = {}
        self._problems: tuple[str, ...] | None = None
        self._known: dict[int, tuple[str, int | None, str | None]] = {}
        self._last_settings: tuple[bool, tuple[Resource, ...]] | None = None
        self.unchanged = False  # the last file read gave the configuration already in force

    # -- what is wanted ------------------------------------------------------------------------

    def _configured(self) -> config.Config | None:
        """The file's configuration, or None (problems logged once) if it is invalid."""
        assert self.config_file is not None
        try:
            conf = config.load(file=self.config_file)
        except ConfigError as err:
            problems = tuple(err.problems)
            if problems != self._problems:
                log.error(
                    "invalid configuration in %s; keeping the current one (%d problem%s):",
                    self.config_file,
                    len(problems),
                    "" if len(problems) == 1 else "s",
                )
                for problem in problems:
                    log.error("  %s", problem)
            self._problems = problems
            return None
        if self._problems is not None:
            log.info("configuration in %s is valid again", self.config_file)
        self._problems = None
        return conf

    def _scan(self) -> dict[str, discovery.Verdict]:
        if self._links is not None:
            links = self._links()
        else:
            with Rtnl() as rtnl:
                links = rtnl.links()
        self._known = {link.index: _key(link) for link in links if link.kind != "macvtap"}
        verdicts = discovery.classify(links, self.filters, self.plugin_dir, self._facts_of)
        for name, verdict in verdicts.items():
            note = verdict.reason if verdict.notable else ""
            if note and self._notes.get(name) != note:
                log.warning("link %s is not offered: %s", name, note)
            self._notes[name] = note
        return verdicts

    def _discovered(self, now: float, before: Mapping[str, Resource | None]) -> Wanted:
        verdicts = self._scan()
        found = {r.name: r for r in discovery.offered(verdicts)}
        wanted: dict[str, Resource] = dict(found)
        result = Wanted(resources=None)
        for name in list(self._missing_since):
            if name in found:
                del self._missing_since[name]
                log.info("link %s is back: its resource stays", name)
            elif name not in before:
                del self._missing_since[name]
        for name, res in sorted(before.items()):
            if name in found:
                continue
            if res != discovery.resource(name):  # configured, not discovered: no link to wait for
                self._missing_since.pop(name, None)
                result.reasons[name] = "not a discovered link"
                continue
            verdict = verdicts.get(name)
            state = f"no longer offered ({verdict.reason})" if verdict else "gone"
            since = self._missing_since.get(name)
            if since is None:
                since = self._missing_since[name] = now
                if self.grace > 0:
                    log.info(
                        "link %s is %s: removing its resource in %g s unless it comes back",
                        name,
                        state,
                        self.grace,
                    )
            if now - since < self.grace:
                wanted[name] = res
                end = since + self.grace
                result.wake = end if result.wake is None else min(result.wake, end)
            else:
                del self._missing_since[name]
                lasted = f" for {self.grace:g} s" if self.grace else ""
                result.reasons[name] = f"link {name} {state}{lasted}"
        result.resources = [wanted[n] for n in sorted(wanted)]
        return result

    def wanted(self, now: float, before: Mapping[str, Resource | None]) -> Wanted:
        """The resources that should run now (from the file, or from the links)."""
        if self.config_file is not None:
            conf = self._configured()
            if conf is None:
                return Wanted(resources=None)
            if self.discovering != conf.discovery:
                log.info(
                    "configuration in %s: %s",
                    self.config_file,
                    f"discovery mode ({self.filters.describe()}; a resource whose link is gone "
                    f"is removed after {self.grace:g} s)"
                    if conf.discovery
                    else "explicit resources",
                )
            self.discovering = conf.discovery
            settings = (conf.discovery, tuple(sorted(conf.resources, key=lambda r: r.name)))
            self.unchanged = settings == self._last_settings
            self._last_settings = settings
            if not conf.discovery:
                self._missing_since.clear()
                return Wanted(resources=sorted(conf.resources, key=lambda r: r.name))
        return self._discovered(now, before)

    # -- one pass ------------------------------------------------------------------------------

    def reconcile(self, *, file_event: bool = False) -> float | None:
        """One pass; returns when a grace period ends (a pass is due then), or None.

        Raises OSError / xmlrpc.client.Error when the kernel or supervisord
        fails: the caller retries. With an invalid configuration the files stay
        as they are, but are still applied: an earlier pass may not have finished.
        """
        now = self._clock()
        wanted = self.wanted(now, programs.current(self.layout))
        if wanted.resources is not None:
            try:
                programs.write(self.layout, wanted.resources, self.plugin_dir, self.base)
            except RenderError as err:  # validated names cannot get here; never crash-loop
                log.error("cannot write the resources' programs; keeping the current ones: %s", err)
        done = self._apply(wanted.reasons)
        if file_event and not done and wanted.resources is not None and self.unchanged:
            log.info("configuration unchanged")
        return wanted.wake

    def _apply(self, reasons: Mapping[str, str]) -> list[str]:
        """Apply the program files on disk; log and return what was done."""
        current = programs.current(self.layout)
        target = {n: r for n, r in current.items() if r is not None}
        with self._connect() as rpc:
            done = apply(rpc, self._live, target, reasons)
        for line in done:
            log.info("%s", line)
        self._live = dict(current)
        return done

    def relevant(self, kind: int, link: Link) -> bool:
        """Whether a link event can change what discovery offers."""
        if kind == RTM_DELLINK:
            return link.index in self._known
        return link.kind != "macvtap" and self._known.get(link.index) != _key(link)

    # -- the event loop ------------------------------------------------------------------------

    def run(self, stop: StopSignal) -> None:
        """Pass at once, then on events and deadlines, until SIGTERM/SIGINT."""
        monitor = LinkMonitor()  # before the first scan: no later change is missed
        watches = FileWatches(self.config_file)
        try:
            self._loop(monitor, watches, stop)
        finally:
            monitor.close()
            watches.close()

    def _loop(self, monitor: LinkMonitor, watches: FileWatches, stop: StopSignal) -> None:
        now = self._clock()
        due: float | None = now  # the first pass: at once
        burst: float | None = None
        grace_at: float | None = None
        retry_at: float | None = None
        retry_delay = RETRY_FIRST
        safety_at = now + SAFETY_INTERVAL
        file_event = False

        def soon(now: float) -> float:
            nonlocal burst
            burst = now if burst is None else burst
            return min(now + DEBOUNCE, burst + DEBOUNCE_MAX)

        while not stop.requested:
            timeout = max(0.0, _earliest(due, grace_at, retry_at, safety_at) - self._clock())
            sources = [monitor.fileno(), stop.fileno(), *watches.filenos()]
            ready = select.select(sources, [], [], timeout)[0]
            if stop.requested:
                return
            now = self._clock()
            if monitor.fileno() in ready:
                try:
                    events = monitor.read()
                    wanted = any(self.relevant(kind, link) for kind, link in events)
                except EventsLost:
                    log.warning("link events were dropped: listing links again")
                    wanted = True
                if wanted and self.discovering:
                    due = soon(now)
            if watches.changed(ready):
                file_event = True
                due = soon(now)
            now = self._clock()
            if _earliest(due, grace_at, retry_at, safety_at) > now:
                continue
            due = burst = retry_at = grace_at = None
            safety_at = now + SAFETY_INTERVAL
            watches.follow()
            try:
                with stop.interruptible():
                    grace_at = self.reconcile(file_event=file_event)
                file_event = False
                retry_delay = RETRY_FIRST
            except (OSError, xmlrpc.client.Error) as err:
                log.warning("pass failed (%s); trying again in %g s", err, retry_delay)
                retry_at = now + retry_delay
                retry_delay = min(retry_delay * 2, RETRY_MAX)


def _earliest(*deadlines: float | None) -> float:
    """The next pass is due at the earliest of the deadlines set (the safety one always is)."""
    return min(d for d in deadlines if d is not None)


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
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

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
        os.close(self._r)
        os.close(self._w)


def main(
    *,
    plugin_dir: str,
    run_dir: str,
    config_file: str | None,
    filters: discovery.Filters,
    grace: float,
    base: Sequence[str],
) -> int:
    """Entry point of the ``reconcile`` program; 0 on SIGTERM/SIGINT."""
    logs.configure("reconcile")
    reconciler = Reconciler(
        Layout(run_dir), plugin_dir, base, config_file=config_file, filters=filters, grace=grace
    )
    stop = StopSignal()
    stop.install()
    if config_file is not None:
        log.info("following configuration file %s", config_file)
    else:
        log.info(
            "discovery mode (%s): following the links of this node; a resource whose link "
            "is gone is removed after %g s",
            filters.describe(),
            grace,
        )
    try:
        reconciler.run(stop)
    except Stopped:
        pass
    finally:
        stop.close()
    log.info("stopped")
    return 0
