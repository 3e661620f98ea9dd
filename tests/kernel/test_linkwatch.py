"""LinkWatcher against the real kernel: every transition of the lower link.

Latencies are only sanity-checked (< 1 s, including the `ip` process that
causes the change); the real figures come from the benchmark.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from macvtapdp.linkwatch import LinkState, LinkWatcher
from tests.netns import NetNS

pytestmark = pytest.mark.kernel

SANITY = 1.0  # seconds


class Recorder:
    """on_change that queues each state; optionally held shut to stall the watcher."""

    def __init__(self) -> None:
        self.seen: list[LinkState] = []
        self.open = threading.Event()
        self.open.set()
        self._queue: queue.Queue[LinkState] = queue.Queue()

    def __call__(self, state: LinkState) -> None:
        self.open.wait(10)
        self.seen.append(state)
        self._queue.put(state)

    def until(self, want: Callable[[LinkState], bool], timeout: float = SANITY) -> LinkState:
        """The first reported state ``want`` accepts; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail(f"no state accepted within {timeout} s; seen {self.seen}")
            if want(state):
                return state


def _start(ns: NetNS, recorder: Recorder) -> LinkWatcher:
    """A watcher of lw0 started in ``ns`` (so its sockets and thread live there)."""
    watcher = LinkWatcher("lw0", recorder)
    with ns.entered():
        watcher.start()
    return watcher


def _change(recorder: Recorder, action: Callable[[], object], describe: str) -> LinkState:
    started = time.monotonic()
    action()
    state = recorder.until(lambda s: s.describe() == describe)
    assert time.monotonic() - started < SANITY
    return state


def test_follows_every_transition(netns: NetNS) -> None:
    netns.veth("lw0")
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        first = recorder.until(lambda s: True, timeout=0)
        assert first.healthy and first.describe() == "up" and watcher.state == first
        ip = netns.ip
        assert not _change(
            recorder, lambda: ip("link", "set", "lw0", "down"), "down (admin)"
        ).healthy
        assert _change(recorder, lambda: ip("link", "set", "lw0", "up"), "up").healthy
        lost = _change(
            recorder,
            lambda: ip("link", "set", "lw0p", "down"),
            "no carrier (operstate lowerlayerdown)",
        )
        assert lost.admin_up and not lost.healthy
        _change(recorder, lambda: ip("link", "set", "lw0p", "up"), "up")
        gone = _change(recorder, lambda: ip("link", "del", "lw0"), "missing")
        assert gone == LinkState(present=False) and not gone.healthy
        back = _change(recorder, lambda: netns.veth("lw0"), "up")
        assert back.healthy and back.index != first.index
        _change(recorder, lambda: ip("link", "set", "lw0", "down"), "down (admin)")
        _change(recorder, lambda: ip("link", "set", "lw0", "name", "lwx"), "missing")
        _change(recorder, lambda: ip("link", "set", "lwx", "name", "lw0"), "down (admin)")
        _change(recorder, lambda: ip("link", "set", "lw0", "up"), "up")
        assert watcher.state == recorder.seen[-1]
    finally:
        watcher.stop()
    assert all(a != b for a, b in zip(recorder.seen, recorder.seen[1:], strict=False))


def test_a_link_that_appears_later(netns: NetNS) -> None:
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        assert recorder.until(lambda s: True, timeout=0).describe() == "missing"
        assert not watcher.state.healthy
        _change(recorder, lambda: netns.veth("lw0"), "up")
    finally:
        watcher.stop()


def test_leaving_a_bridge_is_not_a_deletion(netns: NetNS) -> None:
    """The AF_BRIDGE RTM_DELLINK sent for a leaving port must not read as "missing"."""
    netns.veth("lw0")
    netns.ip("link", "add", "br0", "type", "bridge")
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        netns.ip("link", "set", "lw0", "master", "br0")
        netns.ip("link", "set", "lw0", "nomaster")
        _change(recorder, lambda: netns.ip("link", "set", "lw0", "down"), "down (admin)")
    finally:
        watcher.stop()
    assert all(state.present for state in recorder.seen)


def test_resyncs_after_dropped_events(
    netns: NetNS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    netns.veth("lw0")
    # enough events of the followed link itself (the kernel filter drops the
    # others) to overflow the watcher's socket buffer
    flood = tmp_path / "flood"
    flood.write_text("link set lw0 down\nlink set lw0 up\n" * 3000)
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        recorder.open.clear()  # the next on_change stalls the watcher thread
        netns.ip("link", "set", "lw0", "down")
        netns.ip("-batch", str(flood))
        netns.ip("link", "set", "lw0", "up")
        netns.ip("link", "set", "lw0p", "down")  # the final state, only a resync can see
        with caplog.at_level(logging.WARNING, logger="macvtapdp.linkwatch"):
            recorder.open.set()
            recorder.until(lambda s: s.describe().startswith("no carrier"), timeout=5)
    finally:
        recorder.open.set()
        watcher.stop()
    assert "link events were dropped" in caplog.text


def test_stop_is_fast_and_leaves_nothing_behind(netns: NetNS) -> None:
    netns.veth("lw0")
    fds, threads = set(os.listdir("/proc/self/fd")), set(threading.enumerate())
    watcher = _start(netns, Recorder())
    (thread,) = set(threading.enumerate()) - threads
    # It inherited the namespace start() was called in, so it can resubscribe there.
    in_ns = os.stat(f"/proc/self/task/{thread.native_id}/ns/net").st_ino
    assert in_ns == os.stat(f"/run/netns/{netns.name}").st_ino
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < SANITY / 2
    assert set(threading.enumerate()) == threads
    assert set(os.listdir("/proc/self/fd")) == fds
    watcher.stop()  # again: nothing to do
