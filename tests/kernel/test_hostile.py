"""A hostile node (issue 10), one resource process or the discovery scan, in a fresh netns.

File-descriptor exhaustion against the real resource process (under ``prlimit``, as a
container runtime's limit would be), and the resource cap of discovery against real links.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from harness.kubelet import FakeKubelet
from harness.netns import NetNS
from harness.processes import (
    RESOURCE_DOMAIN,
    Proc,
    rmtree,
    serve_argv,
    short_tempdir,
    tgkill,
    threads_taking,
    until,
)
from macvtapdp import config
from macvtapdp.node import discovery

pytestmark = pytest.mark.kernel

NAME = "lw0"
RESOURCE = f"{RESOURCE_DOMAIN}/{NAME}"
CAPACITY = 4
IDLE = 1100  # connections, past a 1024 descriptor limit


@pytest.fixture
def kubelet(netns: NetNS) -> Iterator[FakeKubelet]:
    netns.veth(NAME)
    plugin_dir = short_tempdir()
    k = FakeKubelet(plugin_dir)
    k.start()
    try:
        yield k
    finally:
        k.stop()
        rmtree(plugin_dir)


def serve_limited(netns: NetNS, kubelet: FakeKubelet, soft: int, hard: int) -> Proc:
    """The resource process under RLIMIT_NOFILE ``soft:hard``, registered and all Healthy."""
    argv = serve_argv(NAME, kubelet.plugin_dir, f"--lower={NAME}", f"--capacity={CAPACITY}")
    proc = Proc(netns, ["prlimit", f"--nofile={soft}:{hard}", "--", *argv])
    healthy = kubelet.wait_for(RESOURCE, lambda s: s.connected and s.allocatable == CAPACITY, 10)
    assert healthy, proc.output.text()
    return proc


def nofile(pid: int) -> tuple[int, int]:
    """The process's (soft, hard) descriptor limit, from /proc."""
    with open(f"/proc/{pid}/limits") as fh:
        [line] = [line for line in fh if line.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def stopped_cleanly(proc: Proc) -> None:
    code = proc.terminate()
    assert "Traceback" not in proc.output.text(), proc.output.text()
    assert code == 0, proc.output.text()


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(
    netns: NetNS, kubelet: FakeKubelet
) -> None:
    proc = serve_limited(netns, kubelet, 1024, 4096)  # raising a hard limit needs privilege
    try:
        assert nofile(proc.pid) == (4096, 4096)
    finally:
        stopped_cleanly(proc)


@contextlib.contextmanager
def idle_connections(path: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``path`` that never say a word (as a leaking client's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            opened.append(sock)
            sock.connect(path)  # the kernel's backlog takes it even if the server never accepts
        yield opened
    finally:
        for sock in opened:
            sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_connections_past_the_descriptor_limit_never_stop_the_kubelets_allocate(
    netns: NetNS, kubelet: FakeKubelet
) -> None:
    proc = serve_limited(netns, kubelet, 1024, 1024)  # nothing to raise: the cap must hold
    try:
        endpoint = kubelet.state(RESOURCE).endpoint
        assert endpoint is not None
        with idle_connections(os.path.join(kubelet.plugin_dir, endpoint), IDLE) as idle:
            assert until(lambda: sum(map(closed_by_peer, idle)) >= IDLE - 64, 10)
            began = time.monotonic()
            for i in range(CAPACITY):  # the kubelet's own connection, made before the flood
                [container] = kubelet.allocate(
                    RESOURCE, [f"{NAME}Mvp{i}"], timeout=10
                ).container_responses
                assert container.devices[0].host_path.startswith("/dev/tap")
            took = time.monotonic() - began
            descriptors = len(os.listdir(f"/proc/{proc.pid}/fd"))
            kept = IDLE - sum(map(closed_by_peer, idle))
            print(
                f"{IDLE} idle connections: {kept} kept open by the server, {descriptors} "
                f"descriptors in use of 1024; {CAPACITY} Allocates took {took * 1000:.1f} ms"
            )
            assert kept <= 64 and descriptors < 512
            assert kubelet.state(RESOURCE).connected

            # a new kubelet must get a connection too, while the idle ones are still open
            before = kubelet.state(RESOURCE).register_count
            restarted = time.monotonic()
            kubelet.restart()
            back = kubelet.wait_for(
                RESOURCE,
                lambda s: s.register_count > before and s.connected and s.allocatable == CAPACITY,
                20,
            )
            print(
                f"kubelet restart during the flood -> Healthy: {time.monotonic() - restarted:.1f}s"
            )
            assert back, proc.output.text()
        assert "File descriptor limit reached" not in proc.output.text()
    finally:
        stopped_cleanly(proc)


def test_discovery_offers_at_most_max_resources_links(netns: NetNS) -> None:
    names = [f"dv{i:02d}" for i in range(config.MAX_RESOURCES + 1)]
    for name in names:
        netns.ip("link", "add", name, "type", "veth", "peer", "name", f"p{name}")
    filters = discovery.Filters(include=("dv*",), kinds=("veth",))
    with netns.entered():
        verdicts = discovery.scan(filters, "/var/lib/kubelet/device-plugins")
    offered = [r.name for r in discovery.offered(verdicts)]
    assert offered == names[: config.MAX_RESOURCES]
    left = verdicts[names[-1]]
    assert not left.offered and left.notable
    assert left.reason == f"more than {config.MAX_RESOURCES} links offered (narrow the filters)"


def test_sigterm_delivered_to_any_thread_stops_the_resource_process_at_once(
    netns: NetNS, kubelet: FakeKubelet
) -> None:
    """Python runs handlers in the main thread only: it must wake up for a signal another
    thread took, not sleep on in its 5 s wait for the plugin directory."""
    argv = serve_argv(NAME, kubelet.plugin_dir, f"--lower={NAME}", f"--capacity={CAPACITY}")
    proc = Proc(netns, argv)
    healthy = kubelet.wait_for(RESOURCE, lambda s: s.connected and s.allocatable == CAPACITY, 10)
    assert healthy, proc.output.text()
    assert proc.output.wait_for(rf"\[{NAME}\] registered {RESOURCE}")
    time.sleep(0.5)  # the main thread is in its wait on the plugin directory by now
    [*_, tid] = threads_taking(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    tgkill(proc.pid, tid, signal.SIGTERM)
    assert proc.wait(10) == 0, proc.output.text()
    took = time.monotonic() - sent
    print(f"SIGTERM to thread {tid}: exit in {took:.3f}s")
    assert took < 3.0, proc.output.text()  # it used to wait out its 5 s directory check
    assert proc.output.wait_for(rf"\[{NAME}\] stopped; socket removed")
    assert kubelet.wait_for(RESOURCE, lambda s: not s.connected, 5)
