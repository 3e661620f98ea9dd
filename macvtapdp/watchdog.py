"""supervisord event listener that brings FATAL programs back, with backoff.

supervisord gives up on a program that keeps dying right after it starts: after
``startretries`` it is FATAL and never started again. A device plugin that
gives up leaves the node without its resource until someone restarts the pod,
so this listener starts a FATAL program again after a delay that doubles from
``FIRST_DELAY`` up to ``MAX_DELAY`` and resets once the program is RUNNING.

It speaks supervisord's event listener protocol on stdin/stdout (so it logs to
stderr) and calls back through the XML-RPC socket supervisord names in
``SUPERVISOR_SERVER_URL``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import IO

log = logging.getLogger("macvtapdp.watchdog")

FIRST_DELAY = 5.0
MAX_DELAY = 60.0

Schedule = Callable[[float, Callable[[], None]], None]


def parse(payload: str) -> dict[str, str]:
    """``key:value key:value`` tokens of an event header or body."""
    return dict(token.split(":", 1) for token in payload.split() if ":" in token)


class Watchdog:
    """Decides when to start each FATAL program again."""

    def __init__(self, start: Callable[[str], None], schedule: Schedule) -> None:
        self._start = start
        self._schedule = schedule
        self._delays: dict[str, float] = {}

    def handle(self, event: str, body: dict[str, str]) -> None:
        name = body.get("processname", "")
        group = body.get("groupname", name)
        if event == "PROCESS_STATE_RUNNING":
            self._delays.pop(name, None)
        elif event == "PROCESS_STATE_FATAL":
            delay = self._delays.get(name, FIRST_DELAY)
            self._delays[name] = min(delay * 2, MAX_DELAY)
            log.warning("%s is FATAL; starting it again in %.0fs", name, delay)
            self._schedule(delay, lambda: self._start(f"{group}:{name}"))


def serve(stdin: IO[str], stdout: IO[str], watchdog: Watchdog) -> None:
    """The event listener loop: READY, read one event, handle it, RESULT OK."""
    while True:
        stdout.write("READY\n")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return  # supervisord went away
        header = parse(line)
        body = stdin.read(int(header.get("len", "0")))
        try:
            watchdog.handle(header.get("eventname", ""), parse(body.split("\n", 1)[0]))
        finally:
            stdout.write("RESULT 2\nOK")
            stdout.flush()


def main() -> int:
    """Entry point of ``macvtapdp watchdog`` under supervisord."""
    from macvtapdp import control, logs

    # supervisord stops us with SIGTERM while we wait for an event: exit cleanly
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logs.configure("watchdog")

    def start(name: str) -> None:
        try:
            with control.connect(os.environ["SUPERVISOR_SERVER_URL"]) as supervisor:
                supervisor.startProcess(name, False)
            log.info("started %s again", name)
        except Exception as err:  # the program may be running again already
            log.warning("could not start %s: %s", name, err)

    def schedule(delay: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(delay, action)
        timer.daemon = True
        timer.start()

    serve(sys.stdin, sys.stdout, Watchdog(start, schedule))
    return 0
