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

from harness.netns import NetNS
from macvtapdp.linux import linkevents
from macvtapdp.linux.bpf import HIGH_INDEX
from macvtapdp.linux.link import Link
from macvtapdp.linux.netlink import Netlink
from macvtapdp.plugin.linkwatch import LinkState, LinkWatcher

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


class Watched:
    """A watcher of lw0 started in a namespace (so its sockets and threads live there)."""

    def __init__(self, ns: NetNS, recorder: Recorder, gone: list[Link] | None = None) -> None:
        with ns.entered():
            self.netlink = Netlink()
            self.watcher = LinkWatcher(
                "lw0", self.netlink, recorder, None if gone is None else gone.append
            )
            self.watcher.start()

    @property
    def state(self) -> LinkState:
        return self.watcher.state

    def stop(self) -> None:
        self.watcher.stop()
        self.netlink.close()


def _start(ns: NetNS, recorder: Recorder, gone: list[Link] | None = None) -> Watched:
    return Watched(ns, recorder, gone)


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
        assert lost.link is not None and lost.link.admin_up and not lost.healthy
        _change(recorder, lambda: ip("link", "set", "lw0p", "up"), "up")
        gone = _change(recorder, lambda: ip("link", "del", "lw0"), "missing")
        assert gone == LinkState() and not gone.healthy
        back = _change(recorder, lambda: netns.veth("lw0"), "up")
        # usually a new ifindex; the kernel may also hand the old one out again (seen under load)
        assert back.healthy and back.link is not None
        _change(recorder, lambda: ip("link", "set", "lw0", "down"), "down (admin)")
        _change(recorder, lambda: ip("link", "set", "lw0", "name", "lwx"), "missing")
        _change(recorder, lambda: ip("link", "set", "lwx", "name", "lw0"), "down (admin)")
        _change(recorder, lambda: ip("link", "set", "lw0", "up"), "up")
        assert watcher.state == recorder.seen[-1]
    finally:
        watcher.stop()
    assert all(a.key != b.key for a, b in zip(recorder.seen, recorder.seen[1:], strict=False))


def test_a_link_that_appears_later(netns: NetNS) -> None:
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        assert recorder.until(lambda s: True, timeout=0).describe() == "missing"
        assert not watcher.state.healthy
        _change(recorder, lambda: netns.veth("lw0"), "up")
    finally:
        watcher.stop()


def test_a_port_of_a_bridge_is_unhealthy_until_released(netns: NetNS) -> None:
    """The kernel refuses a macvtap on a bridge port (EBUSY): its devices are Unhealthy.
    The AF_BRIDGE RTM_DELLINK sent for a leaving port must not read as "missing"."""
    netns.veth("lw0")
    netns.ip("link", "add", "br0", "type", "bridge")
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        busy = recorder.until(lambda s: True, timeout=0)
        busy = _change(
            recorder,
            lambda: netns.ip("link", "set", "lw0", "master", "br0"),
            f"a port of a bridge (index {netns.link('br0')['ifindex']}): busy",  # type: ignore[index]
        )
        assert not busy.healthy and busy.enslaved
        released = _change(recorder, lambda: netns.ip("link", "set", "lw0", "nomaster"), "up")
        assert released.healthy
        _change(recorder, lambda: netns.ip("link", "set", "lw0", "down"), "down (admin)")
    finally:
        watcher.stop()
    assert all(state.present for state in recorder.seen)


def test_sees_its_macvtaps_leave_deleted_or_moved(netns: NetNS) -> None:
    """High-numbered macvtaps' RTM_DELLINK reach on_gone, with where they went."""
    pod = NetNS()
    netns.veth("lw0")
    gone: list[Link] = []
    recorder = Recorder()
    watched = _start(netns, recorder, gone)
    try:
        for n, name in enumerate(("mvtmoved", "mvtdeleted", "mvtlow")):
            index = [] if name == "mvtlow" else ["index", str(HIGH_INDEX + 100 + n)]
            netns.ip("link", "add", "link", "lw0", "name", name, *index, "type", "macvtap")
        netns.ip("link", "set", "mvtmoved", "netns", pod.name)
        netns.ip("link", "del", "mvtdeleted")
        netns.ip("link", "del", "mvtlow")
        deadline = time.monotonic() + SANITY
        while len(gone) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        watched.stop()
        pod.close()
    by_name = {link.name: link for link in gone}
    assert set(by_name) == {"mvtmoved", "mvtdeleted"}
    assert by_name["mvtmoved"].new_netnsid is not None
    assert by_name["mvtdeleted"].new_netnsid is None


def test_resyncs_after_dropped_events(
    netns: NetNS, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    netns.veth("lw0")
    monkeypatch.setattr(linkevents, "MAX_QUEUED", 100)
    # enough events of the followed link itself (the kernel filter drops the
    # others) to overflow what the watcher queues while it is stalled
    flood = tmp_path / "flood"
    flood.write_text("link set lw0 down\nlink set lw0 up\n" * 3000)
    recorder = Recorder()
    watcher = _start(netns, recorder)
    try:
        recorder.open.clear()  # the next on_change stalls the watcher thread
        netns.ip("link", "set", "lw0", "down")
        netns.ip("-batch", str(flood))
        netns.ip("link", "set", "lw0", "up")
        netns.ip("link", "set", "lw0", "name", "lwz")  # the final state, after the flood
        with caplog.at_level(logging.WARNING, logger="macvtapdp.plugin.linkwatch"):
            recorder.open.set()
            recorder.until(lambda s: s.describe() == "missing", timeout=5)
            deadline = time.monotonic() + 5
            while "link events were dropped" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        recorder.open.set()
        watcher.stop()
    assert "link events were dropped" in caplog.text


def test_stop_is_fast_and_leaves_nothing_behind(netns: NetNS) -> None:
    netns.veth("lw0")
    fds, threads = set(os.listdir("/proc/self/fd")), set(threading.enumerate())
    watched = _start(netns, Recorder())
    started_threads = set(threading.enumerate()) - threads
    assert {t.name for t in started_threads} == {"netlink", "linkevents", "linkwatch-lw0"}
    # They inherited the namespace start() was called in, so they can resubscribe there.
    for thread in started_threads:
        in_ns = os.stat(f"/proc/self/task/{thread.native_id}/ns/net").st_ino
        assert in_ns == os.stat(f"/run/netns/{netns.name}").st_ino
    started = time.monotonic()
    watched.watcher.stop()
    assert time.monotonic() - started < SANITY / 2
    watched.netlink.close()
    assert set(threading.enumerate()) == threads
    assert set(os.listdir("/proc/self/fd")) == fds
    watched.watcher.stop()  # again: nothing to do
