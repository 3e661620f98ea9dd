"""End to end: the metrics endpoint of the real ``macvtapdp run``, scraped as Prometheus would.

Three resources named after their lower links, A and B existing, C missing; the node serves
``/metrics``, ``/healthz`` and ``/readyz`` on a fixed port of the test's own namespace. The
scrapes are parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.kubelet import ResourceState
from harness.netns import NetNS
from harness.processes import (
    METRICS_ADDRESS,
    Node,
    processes_mentioning,
    resource,
    rmtree,
    until,
)

pytestmark = pytest.mark.e2e

A, B, C = "mta", "mtb", "mtc"
NAMES = (A, B, C)
CAPACITY = 4
CONF = json.dumps([{"name": n, "master": n, "capacity": CAPACITY} for n in NAMES])
START_TIMEOUT = 20.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def program(name: str) -> str:
    return f"resource-{name}"


def registered(name: str, more_than: int = 0) -> Callable[[ResourceState], bool]:
    return lambda s: s.connected and s.register_count > more_than and len(s.devices) == CAPACITY


@dataclass
class Metered:
    ns: NetNS
    node: Node
    started: bool = False

    def up(self) -> None:
        self.node.kubelet.start()
        self.node.start(f"--metrics-address={METRICS_ADDRESS}")
        self.started = True
        for name in NAMES:
            self.wait(name, registered(name))
        assert until(self.answering, START_TIMEOUT, 0.05), self.node.output.text()
        self.node.running()

    def answering(self) -> bool:
        try:
            return self.node.http_get("/healthz")[0] == 200
        except OSError:
            return False

    def wait(self, name: str, check: Callable[[ResourceState], bool]) -> ResourceState:
        kubelet = self.node.kubelet
        assert kubelet.wait_for(resource(name), check, START_TIMEOUT), kubelet.state(resource(name))
        state: ResourceState = kubelet.state(resource(name))
        return state

    def scrape(self) -> Samples:
        status, body = self.node.http_get("/metrics")
        assert status == 200, body
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

    def pid(self, name: str) -> int:
        return self.node.pid(name)

    def kill(self, name: str) -> None:
        """kill -9 program ``name``; back when supervisord has it RUNNING as a new process."""
        old = self.pid(name)
        os.kill(old, signal.SIGKILL)

        def replaced() -> bool:
            info = self.node.processes()[name]
            return info["statename"] == "RUNNING" and int(info["pid"]) not in (0, old)

        assert until(replaced, START_TIMEOUT, 0.05), self.node.processes()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def of(samples: Samples, name: str) -> Samples:
    """Every sample of the resource ``name`` (its series, whatever the metric)."""
    return {k: v for k, v in samples.items() if ("resource", name) in k[1]}


@pytest.fixture
def metered(netns: NetNS) -> Iterator[Metered]:
    netns.veth(A)
    netns.veth(B)
    setup = Metered(netns, Node(netns, env={"DP_MACVTAP_CONF": CONF}))
    dirs = (setup.node.plugin_dir, setup.node.run_dir)
    try:
        yield setup
    finally:
        code = setup.node.stop()
        leaked = processes_mentioning(*dirs)
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = setup.node.output.text() if setup.started else ""
        assert not leaked, f"processes left behind: {leaked}"
        assert "Traceback" not in output, output
        if setup.started:
            assert code == 0, output


def test_series_after_allocations_a_link_down_and_a_registration(metered: Metered) -> None:
    metered.up()
    kubelet = metered.node.kubelet
    kubelet.allocate(resource(A), [f"{A}Mvp0"])
    kubelet.allocate(resource(A), [f"{A}Mvp0"])  # the app container after the init container
    kubelet.allocate(resource(A), [f"{A}Mvp1", f"{A}Mvp2"])
    with pytest.raises(grpc.RpcError):
        kubelet.allocate(resource(A), ["notOneOfOurs"])
    got = metered.scrape()
    allocations = {
        (n, r): value(got, "macvtapdp_allocations_total", resource=n, result=r)
        for n in NAMES
        for r in ("created", "reused", "failed")
    }
    assert allocations == {
        (A, "created"): 3, (A, "reused"): 1, (A, "failed"): 1,
        (B, "created"): 0, (B, "reused"): 0, (B, "failed"): 0,
        (C, "created"): 0, (C, "reused"): 0, (C, "failed"): 0,
    }  # fmt: skip
    assert value(got, "macvtapdp_allocate_duration_seconds_count", resource=A) == 4
    assert value(got, "macvtapdp_allocate_duration_seconds_bucket", resource=A, le="+Inf") == 4
    assert value(got, "macvtapdp_allocate_duration_seconds_sum", resource=A) > 0
    for name in NAMES:
        assert value(got, "macvtapdp_registrations_total", resource=name) == 1
        assert value(got, "macvtapdp_swept_macvtaps_total", resource=name) == 0
    for name, healthy in ((A, 4), (B, 4), (C, 0)):
        assert value(got, "macvtapdp_devices", resource=name, health="healthy") == healthy
        assert value(got, "macvtapdp_devices", resource=name, health="unhealthy") == 4 - healthy
        up = value(got, "macvtapdp_lower_link_up", resource=name, link=name)
        assert up == (1 if healthy else 0)
    programs = {dict(k[1])["program"]: v for k, v in got.items() if k[0].endswith("restarts_total")}
    assert programs == {"watchdog": 0, "metrics": 0, **{program(n): 0 for n in NAMES}}

    metered.ns.ip("link", "set", B, "down")
    metered.wait(B, lambda s: s.connected and s.allocatable == 0 and len(s.devices) == CAPACITY)
    assert until(
        lambda: value(metered.scrape(), "macvtapdp_lower_link_up", resource=B, link=B) == 0, 5
    )
    got = metered.scrape()
    assert value(got, "macvtapdp_devices", resource=B, health="healthy") == 0
    assert value(got, "macvtapdp_devices", resource=B, health="unhealthy") == 4

    kubelet.restart()
    for name in NAMES:
        metered.wait(name, registered(name))
    again = metered.scrape()
    for name in NAMES:
        assert value(again, "macvtapdp_registrations_total", resource=name) == 2
    assert value(again, "macvtapdp_allocations_total", resource=A, result="created") == 3


def test_a_killed_resource_keeps_its_counts_and_the_others_their_series(
    metered: Metered,
) -> None:
    metered.up()
    kubelet = metered.node.kubelet
    kubelet.allocate(resource(A), [f"{A}Mvp0", f"{A}Mvp1"])
    kubelet.allocate(resource(B), [f"{B}Mvp0"])
    before = metered.scrape()
    old = metered.pid(program(A))
    registrations = kubelet.state(resource(A)).register_count

    metered.kill(program(A))
    metered.wait(A, registered(A, registrations))
    after = metered.scrape()
    assert of(after, B) == of(before, B)  # untouched, to the last sample
    assert of(after, C) == of(before, C)
    assert value(after, "macvtapdp_allocations_total", resource=A, result="created") == 2
    assert value(after, "macvtapdp_allocate_duration_seconds_count", resource=A) == 2
    assert value(after, "macvtapdp_registrations_total", resource=A) == 2  # 1 + the new one
    # the dead process's gauges are gone, not added to the new one's
    assert value(after, "macvtapdp_devices", resource=A, health="healthy") == 4
    assert value(after, "macvtapdp_lower_link_up", resource=A, link=A) == 1
    assert value(after, "macvtapdp_program_restarts_total", program=program(A)) == 1
    assert value(after, "macvtapdp_program_restarts_total", program=program(B)) == 0
    files = os.listdir(os.path.join(metered.node.run_dir, "metrics"))
    assert not [f for f in files if f"_{old}." in f], files  # folded into the archive

    kubelet.allocate(resource(A), [f"{A}Mvp2"])
    metered.kill(program(A))  # and once more: the archive takes the next one in
    metered.wait(A, registered(A, registrations + 1))
    last = metered.scrape()
    assert value(last, "macvtapdp_allocations_total", resource=A, result="created") == 3
    assert value(last, "macvtapdp_allocations_total", resource=A, result="reused") == 0
    assert value(last, "macvtapdp_registrations_total", resource=A) == 3
    assert value(last, "macvtapdp_devices", resource=A, health="healthy") == 4
    assert value(last, "macvtapdp_program_restarts_total", program=program(A)) == 2
    assert of(last, B) == of(before, B)


def test_healthz_and_readyz_follow_supervisord_and_the_resources(metered: Metered) -> None:
    metered.up()
    node = metered.node
    assert node.http_get("/healthz") == (200, "ok: supervisord is RUNNING\n")
    status, body = node.http_get("/readyz")
    assert status == 200 and body.startswith("ok: 3 resources\n"), body

    assert node.supervisorctl("stop", program(A)).returncode == 0
    status, body = node.http_get("/readyz")
    assert status == 503 and f"{A}: not serving (process stopped)" in body, body
    assert node.http_get("/healthz")[0] == 200  # the pod is alive: do not restart it
    assert node.supervisorctl("start", program(A)).returncode == 0
    metered.wait(A, registered(A, 1))
    assert until(lambda: node.http_get("/readyz")[0] == 200, 10)

    hung = metered.pid(program(B))
    os.kill(hung, signal.SIGSTOP)  # running, but its socket does not answer
    try:
        status, body = node.http_get("/readyz")
        assert status == 503 and f"{B}: not serving (process running)" in body, body
    finally:
        os.kill(hung, signal.SIGCONT)
    assert until(lambda: node.http_get("/readyz")[0] == 200, 10)

    assert node.proc is not None
    supervisord = node.proc.pid  # `ip netns exec` and `run` exec: this is supervisord
    os.kill(supervisord, signal.SIGSTOP)
    try:
        status, body = node.http_get("/healthz")
        assert status == 503 and body.startswith("not ok: supervisord does not answer"), body
        assert node.http_get("/readyz")[0] == 503
        assert node.http_get("/metrics")[0] == 200  # metrics do not need supervisord
    finally:
        os.kill(supervisord, signal.SIGCONT)
    assert until(lambda: node.http_get("/healthz")[0] == 200, 10)
    assert node.http_get("/readyz")[0] == 200


def test_restarts_are_counted_across_restarts_of_the_watchdog_and_the_endpoint(
    metered: Metered,
) -> None:
    metered.up()
    kubelet = metered.node.kubelet
    kubelet.allocate(resource(B), [f"{B}Mvp0"])
    metered.kill(program(A))
    metered.wait(A, registered(A, 1))
    assert value(metered.scrape(), "macvtapdp_program_restarts_total", program=program(A)) == 1

    metered.kill("watchdog")
    metered.kill(program(A))
    metered.wait(A, registered(A, 2))
    got = metered.scrape()
    assert value(got, "macvtapdp_program_restarts_total", program=program(A)) == 2
    assert value(got, "macvtapdp_program_restarts_total", program="watchdog") == 1

    metered.kill("metrics")
    assert until(metered.answering, START_TIMEOUT, 0.05)
    got = metered.scrape()
    assert value(got, "macvtapdp_program_restarts_total", program="metrics") == 1
    assert value(got, "macvtapdp_program_restarts_total", program=program(A)) == 2
    assert value(got, "macvtapdp_program_restarts_total", program=program(B)) == 0
    assert value(got, "macvtapdp_allocations_total", resource=B, result="created") == 1
    assert value(got, "macvtapdp_registrations_total", resource=A) == 3


def test_a_full_run_dir_turns_metrics_off_and_serving_goes_on(metered: Metered) -> None:
    """On a full tmpfs a first store to a sparse mmap'ed page is SIGBUS: a resource process
    that starts then must run without metrics, not crash."""
    run_dir = metered.node.run_dir
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", run_dir], check=True
    )
    try:
        metered.up()
        kubelet = metered.node.kubelet
        kubelet.allocate(resource(A), [f"{A}Mvp0"])
        filler = os.path.join(run_dir, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, bytes(4096)):  # until ENOSPC
                    pass
        finally:
            os.close(fd)
        b_pid = metered.pid(program(B))
        metered.kill(program(A))
        metered.wait(A, registered(A, 1))
        assert metered.node.output.wait_for(
            rf"\[{A}\] metrics off for this process: cannot make its metrics files in "
            rf"{run_dir}/metrics: No space left on device"
        )
        kubelet.allocate(resource(A), [f"{A}Mvp1"])  # serves on
        kubelet.allocate(resource(B), [f"{B}Mvp0"])  # B's files were made before: it counts
        got = metered.scrape()
        assert value(got, "macvtapdp_allocations_total", resource=B, result="created") == 1
        assert value(got, "macvtapdp_allocations_total", resource=A, result="created") == 1
        assert ("macvtapdp_devices", (("health", "healthy"), ("resource", A))) not in got
        assert value(got, "macvtapdp_devices", resource=B, health="healthy") == 4
        a_pid = metered.pid(program(A))
        assert metered.node.processes()[program(A)]["statename"] == "RUNNING"
        assert metered.pid(program(B)) == b_pid

        os.unlink(filler)  # the restart count the watchdog could not write shows up
        assert until(
            lambda: (
                value(metered.scrape(), "macvtapdp_program_restarts_total", program=program(A)) == 1
            ),
            15,
        )
        assert metered.pid(program(A)) == a_pid
    finally:
        metered.node.stop()
        subprocess.run(["umount", "-l", run_dir], check=False)
        rmtree(run_dir)
