"""What should run: the configuration file's resources, or the links discovery offers.

A configuration file that fails validation wants nothing new: every problem
is logged, one line each (once per distinct set of problems), and the
resources in force keep running. In discovery mode a link that disappears
keeps its resource for the discovery grace (default 5 s): its resource process
reports the devices Unhealthy at once, and a link that comes back within the
grace (a driver reload, a bond re-created) keeps its process and its kubelet
stream. After the grace the resource goes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from macvtapdp import config
from macvtapdp.config import Resource
from macvtapdp.errors import ConfigError
from macvtapdp.linux.link import Link
from macvtapdp.linux.linkevents import DELLINK
from macvtapdp.node import discovery

log = logging.getLogger("macvtapdp.reconcile")


@dataclass
class Wanted:
    """The outcome of working out what should run."""

    resources: list[Resource] | None  # None: invalid configuration, keep what runs
    wake: float | None = None  # a grace period ends then: look again
    reasons: dict[str, str] = field(default_factory=dict)  # why a resource goes


def _key(link: Link) -> tuple[str, int | None, str | None]:
    return (link.name, link.master_index, link.kind)


class WantedResources:
    """Works out the wanted resources, remembering what it needs between passes."""

    def __init__(
        self,
        plugin_dir: str,
        *,
        config_file: str | None,
        filters: discovery.Filters,
        grace: float,
        links: Callable[[], list[Link]],
        facts_of: discovery.FactsOf = discovery.sysfs_facts,
    ) -> None:
        self.plugin_dir = plugin_dir
        self.config_file = config_file
        self.filters = filters
        self.grace = grace
        self._links = links
        self._facts_of = facts_of
        self.discovering = config_file is None
        self._missing_since: dict[str, float] = {}
        self._notes: dict[str, str] = {}
        self._problems: tuple[str, ...] | None = None
        self._known: dict[int, tuple[str, int | None, str | None]] = {}
        self._last_settings: tuple[bool, tuple[Resource, ...]] | None = None
        self.unchanged = False  # the last file read gave the configuration already in force

    def _configured(self) -> config.Config | None:
        """The file's configuration, or None (problems logged once) if it is invalid."""
        assert self.config_file is not None
        try:
            conf = config.load(file=self.config_file)
            config.check_fits(conf.resources, self.plugin_dir)  # could never be served
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
        links = self._links()
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

    def relevant(self, kind: str, link: Link) -> bool:
        """Whether a link event can change what discovery offers."""
        if kind == DELLINK:
            return link.index in self._known
        return link.kind != "macvtap" and self._known.get(link.index) != _key(link)
