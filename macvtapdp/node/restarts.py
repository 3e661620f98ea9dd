"""How often supervisord restarted each program: the watchdog counts, the endpoint reads.

A restart is a ``PROCESS_STATE_STARTING`` event from ``EXITED``, ``BACKOFF`` or
``FATAL`` (a program's first start is from ``STOPPED``, and so is a start by
the reconciler after it stopped one on purpose). The watchdog sees every such
event, including its own restart: supervisord keeps a listener's events
buffered while it is down and sends them once it is back.

The counts survive the watchdog: they live in ``Layout.restarts_file``,
written whole after every change together with the serial of the last event
counted. A watchdog killed after writing but before acknowledging an event gets
that event again from supervisord, and does not count it twice (serials only
grow). A write that fails (a full disk) is tried again at the next change;
the counts stay in memory meanwhile.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from macvtapdp import files

log = logging.getLogger("macvtapdp.watchdog")

RESTARTED_FROM = frozenset({"EXITED", "BACKOFF", "FATAL"})
_LIMIT = 1 << 20


def read(path: str) -> tuple[dict[str, int], int]:
    """(program -> restarts, last serial counted) from ``path``; nothing yet: ({}, -1)."""
    try:
        data: Any = json.loads(files.read_regular(path, _LIMIT))
    except FileNotFoundError:
        return {}, -1
    except (OSError, ValueError) as err:
        log.warning("restart counts in %s cannot be read (%s); counting from zero", path, err)
        return {}, -1
    counts = data.get("restarts") if isinstance(data, dict) else None
    serial = data.get("serial") if isinstance(data, dict) else None
    if not isinstance(counts, dict) or not isinstance(serial, int):
        return {}, -1
    return {str(k): v for k, v in counts.items() if isinstance(v, int) and v >= 0}, serial


class Restarts:
    """The counts, from ``path`` and from supervisord's events."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counts, self.serial = read(path)
        self._unsaved = False
        self._failing = False

    def event(self, serial: int, name: str, body: dict[str, str]) -> None:
        """One event from supervisord (its header's serial, name, and payload's first line)."""
        if serial <= self.serial or not name.startswith("PROCESS_STATE_"):
            return
        program = body.get("processname")
        if not program:
            return
        restarted = name == "PROCESS_STATE_STARTING" and body.get("from_state") in RESTARTED_FROM
        if restarted:
            self.counts[program] = self.counts.get(program, 0) + 1
        elif program in self.counts:
            return
        else:
            self.counts[program] = 0  # known from now on: its series starts at 0
        self.serial = serial
        self._unsaved = True
        self.save()

    def save(self) -> None:
        if not self._unsaved:
            return
        text = json.dumps({"restarts": self.counts, "serial": self.serial}, sort_keys=True)
        try:
            files.write_atomically(self.path, text + "\n")
        except OSError as err:
            if not self._failing:  # once per streak: a full disk fails every time
                log.warning("cannot write restart counts to %s: %s", self.path, err.strerror or err)
            self._failing = True
            return
        if self._failing:
            log.info("restart counts written to %s again", self.path)
        self._unsaved = self._failing = False
