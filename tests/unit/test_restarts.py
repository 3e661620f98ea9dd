"""Restart counts: which events are restarts, and counts that outlive the watchdog."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from macvtapdp.node import restarts
from macvtapdp.node.restarts import Restarts


def starting(program: str, from_state: str) -> dict[str, str]:
    return {"processname": program, "groupname": program, "from_state": from_state}


def test_a_restart_is_a_start_from_exited_backoff_or_fatal(tmp_path: Path) -> None:
    counts = Restarts(str(tmp_path / "restarts.json"))
    counts.event(1, "PROCESS_STATE_STARTING", starting("resource-a", "STOPPED"))  # first start
    counts.event(2, "PROCESS_STATE_RUNNING", starting("resource-a", "STARTING"))
    assert counts.counts == {"resource-a": 0}
    counts.event(3, "PROCESS_STATE_EXITED", starting("resource-a", "RUNNING"))
    counts.event(4, "PROCESS_STATE_STARTING", starting("resource-a", "EXITED"))  # autorestart
    counts.event(5, "PROCESS_STATE_STARTING", starting("resource-a", "BACKOFF"))  # a retry
    counts.event(6, "PROCESS_STATE_STARTING", starting("resource-a", "FATAL"))  # the watchdog's
    counts.event(7, "PROCESS_STATE_STARTING", starting("resource-b", "STOPPED"))
    counts.event(8, "TICK_5", {"when": "1000"})
    counts.event(9, "PROCESS_STATE_STARTING", starting("resource-b", "STOPPED"))  # reconciled
    assert counts.counts == {"resource-a": 3, "resource-b": 0}
    assert restarts.read(counts.path) == ({"resource-a": 3, "resource-b": 0}, 7)


def test_the_counts_outlive_the_watchdog_and_a_resent_event_counts_once(tmp_path: Path) -> None:
    path = str(tmp_path / "restarts.json")
    first = Restarts(path)
    first.event(10, "PROCESS_STATE_STARTING", starting("resource-a", "EXITED"))
    # killed after writing, before acknowledging: supervisord sends event 10 again
    second = Restarts(path)
    second.event(10, "PROCESS_STATE_STARTING", starting("resource-a", "EXITED"))
    assert second.counts == {"resource-a": 1}
    second.event(11, "PROCESS_STATE_STARTING", starting("watchdog", "EXITED"))  # its own
    second.event(12, "PROCESS_STATE_STARTING", starting("resource-a", "BACKOFF"))
    assert restarts.read(path) == ({"resource-a": 2, "watchdog": 1}, 12)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", ({}, -1)),
        ("{", ({}, -1)),
        ("[]", ({}, -1)),
        ('{"restarts": [], "serial": 3}', ({}, -1)),
        ('{"restarts": {"a": "x", "b": -1, "c": 2}, "serial": 3}', ({"c": 2}, 3)),
    ],
)
def test_an_unreadable_file_counts_from_zero(
    tmp_path: Path, content: str, expected: tuple[dict[str, int], int]
) -> None:
    path = tmp_path / "restarts.json"
    path.write_text(content)
    assert restarts.read(str(path)) == expected


def test_a_failed_write_keeps_the_counts_and_is_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    counts = Restarts(str(directory / "restarts.json"))
    os.chmod(directory, 0o500)
    try:
        if os.access(directory, os.W_OK):  # root ignores the mode: take the directory away
            os.chmod(directory, 0o700)
            os.rename(directory, tmp_path / "gone")
        counts.event(1, "PROCESS_STATE_STARTING", starting("resource-a", "EXITED"))
        counts.event(2, "PROCESS_STATE_STARTING", starting("resource-a", "EXITED"))
        assert counts.counts == {"resource-a": 2}
        assert caplog.text.count("cannot write restart counts") == 1  # once per streak
    finally:
        if (tmp_path / "gone").exists():
            os.rename(tmp_path / "gone", directory)
        os.chmod(directory, 0o700)
    counts.save()  # as at the next TICK_5
    assert json.loads((directory / "restarts.json").read_text())["restarts"] == {"resource-a": 2}
