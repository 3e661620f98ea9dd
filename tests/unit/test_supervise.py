"""The prompt supervisord: the supervisor internals it relies on, and what it changes."""

from __future__ import annotations

import inspect
import os
import signal
import time
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

from supervisor import poller, supervisord

from macvtapdp.node.supervise import PromptSupervisor, WakefulPoller


def test_supervisor_internals_are_the_ones_patched() -> None:
    """If a supervisor upgrade moves these, the shim must be revisited (pinned to 4.3.x)."""
    assert version("supervisor").startswith("4.3.")
    assert poller.Poller is poller.PollPoller
    assert list(inspect.signature(poller.PollPoller._poll_fds).parameters) == ["self", "timeout"]
    assert list(inspect.signature(supervisord.Supervisor.reap).parameters) == [
        "self",
        "once",
        "recursionguard",
    ]
    loop = inspect.getsource(supervisord.Supervisor.runforever)
    assert loop.index("group.transition()") < loop.index("self.reap()")


def _options() -> Any:
    return SimpleNamespace(logger=SimpleNamespace(blather=lambda *a, **k: None))


def test_first_poll_does_not_wait_and_a_signal_ends_a_poll() -> None:
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    wakeful = WakefulPoller(_options())
    try:
        started = time.monotonic()
        assert wakeful.poll(30) == ([], [])  # stock: sleeps the whole timeout
        assert time.monotonic() - started < 20
        os.kill(os.getpid(), signal.SIGUSR2)  # pending on the wakeup pipe
        started = time.monotonic()
        assert wakeful.poll(30) == ([], [])
        assert time.monotonic() - started < 20
    finally:
        wakeful.close()
        signal.signal(signal.SIGUSR2, previous)


class Group:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def transition(self) -> None:
        self.log.append("transition")

    def __lt__(self, other: Group) -> bool:
        return id(self) < id(other)


def test_programs_step_right_after_reaping() -> None:
    log: list[str] = []

    def waitpid() -> tuple[int, int]:
        log.append("waitpid")
        return 0, 0  # nothing to reap

    options = SimpleNamespace(
        waitpid=waitpid,
        pidhistory={},
        logger=SimpleNamespace(),
    )
    sup = PromptSupervisor.__new__(PromptSupervisor)
    sup.options = options
    sup.process_groups = {"a": Group(log)}
    sup.reap()
    assert log == ["waitpid", "transition"]
