"""supervisord event listener that brings FATAL programs back, with backoff.

supervisord gives up on a program that keeps dying right after it starts: after
``startretries`` it is FATAL and never started again. A device plugin that
gives up leaves the node without its resource until someone restarts the pod,
so this listener starts a FATAL program again once it has been FATAL for a
delay that doubles from ``FIRST_DELAY`` up to ``MAX_DELAY`` (reset once the
program is RUNNING).

What must be restarted is read from supervisord at every FATAL event and every
``TICK_5``, not remembered: a watchdog killed during a backoff is restarted by
supervisord and finds the FATAL program again (it forgets only how far the
delay had grown). With metrics on, it also counts every program's restarts
(``node.restarts``) for the endpoint. The protocol is supervisor's own
``childutils.listener`` on stdin/stdout (so this process logs to stderr); the
calls back go through ``control`` with a timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from supervisor import childutils

from macvtapdp.errors import MacvtapdpError

log = logging.getLogger("macvtapdp.watchdog")

FIRST_DELAY = 5.0
MAX_DELAY = 60.0


class Watchdog:
    """Decides which FATAL programs to start again, from supervisord's process list."""

    def __init__(
        self, start: Callable[[str], None], clock: Callable[[], float] = time.time
    ) -> None:
        self._start = start
        self._clock = clock
        self._delays: dict[str, float] = {}

    def delay(self, name: str) -> float:
        return self._delays.get(name, FIRST_DELAY)

    def running(self, name: str) -> None:
        self._delays.pop(name, None)

    def check(self, infos: list[dict[str, Any]]) -> list[str]:
        """Start every program that has been FATAL long enough; the names started."""
        started = []
        for info in infos:
            if info.get("statename") != "FATAL":
                continue
            name = f"{info['group']}:{info['name']}"
            delay = self.delay(name)
            since = float(info.get("stop") or 0) or float(info.get("now") or 0)
            if self._clock() - since < delay:
                continue
            self._delays[name] = min(delay * 2, MAX_DELAY)
            log.warning("%s has been FATAL for %.0f s; starting it again", name, delay)
            self._start(name)
            started.append(name)
        return started


def handle(
    watchdog: Watchdog,
    event: str,
    body: dict[str, str],
    processes: Callable[[], list[dict[str, Any]]],
) -> None:
    """One event: a RUNNING program resets its delay; FATAL and TICK_5 look at them all."""
    if event == "PROCESS_STATE_RUNNING":
        name = body.get("processname", "")
        watchdog.running(f"{body.get('groupname', name)}:{name}")
    elif event in ("PROCESS_STATE_FATAL", "TICK_5"):
        watchdog.check(processes())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``watchdog`` event listener under supervisord."""
    from macvtapdp import logs, settings
    from macvtapdp.linux import process
    from macvtapdp.node.control import Supervisor

    try:
        node = settings.from_argv(settings.Node, sys.argv[1:] if argv is None else argv)
    except MacvtapdpError as err:
        print(f"macvtapdp: error: {err}", file=sys.stderr)
        return 2
    # supervisord stops us with SIGTERM while we wait for an event: exit cleanly
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logs.configure("watchdog")
    process.die_with_parent()
    supervisor = Supervisor(os.environ["SUPERVISOR_SERVER_URL"])

    def start(name: str) -> None:
        try:
            supervisor.call("startProcess", name, False)
            log.info("started %s again", name)
        except MacvtapdpError as err:  # it may be running again already
            log.warning("could not start %s: %s", name, err)

    def processes() -> list[dict[str, Any]]:
        try:
            return supervisor.processes()
        except MacvtapdpError as err:
            log.warning("cannot list programs: %s", err)
            return []

    watchdog = Watchdog(start)
    restarts = None
    if node.metrics_address:  # the metrics endpoint serves the counts
        from macvtapdp.node.restarts import Restarts
        from macvtapdp.rundir import Layout

        restarts = Restarts(Layout(node.plugin.run_dir).restarts_file)
    while True:
        try:
            headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        except (KeyError, ValueError):  # end of input: supervisord went away
            return 0
        try:
            first = payload.split("\n", 1)[0]
            body = dict(t.split(":", 1) for t in first.split() if ":" in t)
            name = headers.get("eventname", "")
            if restarts is not None:
                serial = headers.get("serial", "")
                restarts.event(int(serial) if serial.isdigit() else -1, name, body)
                if name == "TICK_5":
                    restarts.save()  # one that failed (a full disk) is tried again
            handle(watchdog, name, body, processes)
        finally:
            childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
