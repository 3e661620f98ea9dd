"""The FATAL watchdog: supervisord's event protocol, and a backoff derived from supervisord."""

from __future__ import annotations

import io
from typing import Any

from supervisor import childutils

from macvtapdp.node import watchdog


def event(name: str, body: str) -> str:
    header = f"ver:3.0 server:supervisor serial:1 pool:watchdog poolserial:1 eventname:{name}"
    return f"{header} len:{len(body)}\n{body}"


def info(name: str, state: str, stop: float) -> dict[str, Any]:
    return {"name": name, "group": name, "statename": state, "stop": stop, "now": stop}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_childutils_speaks_the_event_listener_protocol_we_rely_on() -> None:
    stdin = io.StringIO(event("TICK_5", "when:1000"))
    stdout = io.StringIO()
    headers, payload = childutils.listener.wait(stdin, stdout)
    childutils.listener.ok(stdout)
    assert headers["eventname"] == "TICK_5" and payload == "when:1000"
    assert stdout.getvalue() == "READY\nRESULT 2\nOK"


def test_a_fatal_program_is_started_once_it_has_been_fatal_long_enough() -> None:
    clock, started = Clock(), list[str]()
    dog = watchdog.Watchdog(started.append, clock)
    fatal = [info("resource-a", "FATAL", stop=1000.0), info("resource-b", "RUNNING", 0)]
    assert dog.check(fatal) == []
    clock.now = 1004.9
    assert dog.check(fatal) == []
    clock.now = 1005.0
    assert dog.check(fatal) == ["resource-a:resource-a"]
    assert started == ["resource-a:resource-a"]


def test_backoff_doubles_up_to_a_bound_and_resets_when_running() -> None:
    clock, started = Clock(), list[str]()
    dog = watchdog.Watchdog(started.append, clock)
    delays = []
    for _ in range(7):
        delays.append(dog.delay("resource-a:resource-a"))
        clock.now += 100
        dog.check([info("resource-a", "FATAL", stop=clock.now - 100)])
    dog.running("resource-a:resource-a")
    delays.append(dog.delay("resource-a:resource-a"))
    assert delays == [5, 10, 20, 40, 60, 60, 60, 5]
    assert len(started) == 7


def test_what_to_restart_comes_from_supervisord_not_from_memory() -> None:
    """A new watchdog (the old one was killed during its backoff) finds the FATAL program."""
    clock, started = Clock(), list[str]()
    clock.now = 2000.0
    fresh = watchdog.Watchdog(started.append, clock)
    fatal = [info("resource-a", "FATAL", stop=1990.0)]
    watchdog.handle(fresh, "TICK_5", {"when": "2000"}, lambda: fatal)
    assert started == ["resource-a:resource-a"]


def test_running_events_reset_and_other_events_list_nothing() -> None:
    calls = []
    dog = watchdog.Watchdog(lambda name: None)
    dog._delays["resource-a:resource-a"] = 40.0

    def processes() -> list[dict[str, Any]]:
        calls.append(1)
        return []

    body = {"processname": "resource-a", "groupname": "resource-a"}
    watchdog.handle(dog, "PROCESS_STATE_RUNNING", body, processes)
    watchdog.handle(dog, "PROCESS_STATE_STARTING", body, processes)
    assert dog.delay("resource-a:resource-a") == 5.0 and calls == []
