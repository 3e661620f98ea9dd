"""The FATAL watchdog: supervisord's event protocol, and its bounded backoff."""

from __future__ import annotations

import io
from collections.abc import Callable

from macvtapdp import watchdog


def event(name: str, body: str) -> str:
    header = f"ver:3.0 server:supervisor serial:1 pool:watchdog poolserial:1 eventname:{name}"
    return f"{header} len:{len(body)}\n{body}"


class Recorder:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.delays: list[float] = []

    def schedule(self, delay: float, action: Callable[[], None]) -> None:
        self.delays.append(delay)
        action()


def test_speaks_the_event_listener_protocol() -> None:
    rec = Recorder()
    stdin = io.StringIO(
        event(
            "PROCESS_STATE_FATAL", "processname:resource-a groupname:resource-a from_state:BACKOFF"
        )
    )
    stdout = io.StringIO()
    watchdog.serve(stdin, stdout, watchdog.Watchdog(rec.started.append, rec.schedule))
    assert stdout.getvalue() == "READY\nRESULT 2\nOKREADY\n"
    assert rec.started == ["resource-a:resource-a"]


def test_backoff_doubles_up_to_a_bound_and_resets_when_running() -> None:
    rec = Recorder()
    dog = watchdog.Watchdog(rec.started.append, rec.schedule)
    fatal = {"processname": "resource-a", "groupname": "resource-a"}
    for _ in range(7):
        dog.handle("PROCESS_STATE_FATAL", fatal)
    dog.handle("PROCESS_STATE_RUNNING", fatal)
    dog.handle("PROCESS_STATE_FATAL", fatal)
    assert rec.delays == [5, 10, 20, 40, 60, 60, 60, 5]
    assert len(rec.started) == 8


def test_each_program_has_its_own_backoff() -> None:
    rec = Recorder()
    dog = watchdog.Watchdog(rec.started.append, rec.schedule)
    dog.handle("PROCESS_STATE_FATAL", {"processname": "resource-a", "groupname": "resource-a"})
    dog.handle("PROCESS_STATE_FATAL", {"processname": "resource-b", "groupname": "resource-b"})
    assert rec.delays == [5, 5]
