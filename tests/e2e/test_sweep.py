"""End to end: the sweep of ``macvtapdp run`` under the real supervisord, with the kubelet
stand-in's PodResources server on a socket of its own, ``macvtapdp status`` showing it and
the metrics endpoint counting what it swept."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from harness.kubelet import FakeKubelet
from harness.netns import NetNS
from harness.processes import (
    METRICS_ADDRESS,
    Node,
    processes_mentioning,
    resource,
    rmtree,
    short_tempdir,
    until,
)
from macvtapdp.naming import interface_name
from tests.e2e.test_metrics import Metered, value

pytestmark = pytest.mark.e2e

NAME = "swe"
RESOURCE = resource(NAME)
CAPACITY = 4
IDS = [f"{NAME}Mvp{i}" for i in range(CAPACITY)]
GRACE = 1.0
WAIT = 20.0


@pytest.fixture
def node(netns: NetNS) -> Iterator[Node]:
    netns.veth(NAME)
    pr_dir = short_tempdir()
    socket_path = os.path.join(pr_dir, "pod-resources", "kubelet.sock")
    conf = json.dumps([{"name": NAME, "master": NAME, "capacity": CAPACITY}])
    n = Node(netns, env={"DP_MACVTAP_CONF": conf, "MACVTAPDP_POD_RESOURCES_SOCKET": socket_path})
    n.kubelet = FakeKubelet(n.plugin_dir, pod_resources_socket=socket_path)
    dirs = (n.plugin_dir, n.run_dir)
    try:
        yield n
    finally:
        started = n.proc is not None
        code = n.stop()
        rmtree(pr_dir)
        leaked = processes_mentioning(*dirs)
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = n.output.text() if started else ""
        assert not leaked, f"processes left behind: {leaked}"
        assert "Traceback" not in output, output
        assert code == 0, output


def sweep_column(node: Node) -> str:
    done = node.status()
    head, *lines = done.stdout.splitlines()
    start, end = head.index("SWEEP"), head.index("LOWER LINK")
    [row] = [line for line in lines if line.split()[0] == NAME]
    return row[start:end].strip()


def macvtap(node: Node, dev_id: str) -> dict[str, object] | None:
    return node.ns.link(interface_name(dev_id))


def swept_total(metrics: Metered) -> float:
    return value(metrics.scrape(), "macvtapdp_swept_macvtaps_total", resource=NAME)


def test_run_sweeps_what_pods_left_and_pauses_without_the_api(node: Node) -> None:
    kubelet = node.kubelet
    kubelet.start()
    node.start(f"--sweep-grace={GRACE:g}", f"--metrics-address={METRICS_ADDRESS}")
    metrics = Metered(node.ns, node, started=True)
    assert kubelet.wait_for(RESOURCE, lambda s: s.connected and s.allocatable == CAPACITY, WAIT)
    assert until(metrics.answering, WAIT, 0.05), node.output.text()
    kubelet.admit("vm1", "compute", RESOURCE, [IDS[0]])
    kubelet.admit("vm2", "compute", RESOURCE, [IDS[1]])
    assert until(lambda: sweep_column(node) == "active", WAIT), node.status().stdout

    kubelet.remove_pod("vm2")
    assert until(lambda: macvtap(node, IDS[1]) is None, WAIT)
    assert macvtap(node, IDS[0]) is not None  # vm1 is listed
    assert node.output.wait_for(rf"\[{NAME}\] swept {IDS[1]} \({interface_name(IDS[1])}, ")
    assert until(lambda: swept_total(metrics) == 1, WAIT, 0.05), swept_total(metrics)

    kubelet.stop_pod_resources()  # e.g. the kubelet restarting
    why = f"paused: no socket at {kubelet.pod_resources_socket}"
    assert until(lambda: sweep_column(node) == why, WAIT), node.status().stdout
    assert node.output.wait_for(rf"\[{NAME}\] sweep paused: no socket at ")
    kubelet.remove_pod("vm1")
    time.sleep(4 * GRACE)  # rounds keep failing meanwhile
    assert macvtap(node, IDS[0]) is not None
    assert swept_total(metrics) == 1

    kubelet.start_pod_resources()
    assert until(lambda: macvtap(node, IDS[0]) is None, WAIT)
    assert until(lambda: swept_total(metrics) == 2, WAIT, 0.05), swept_total(metrics)
    assert until(lambda: sweep_column(node) == "active", WAIT), node.status().stdout

    # A swept device allocated again gets a new macvtap, and its container starts
    kubelet.admit("vm3", "compute", RESOURCE, [IDS[0]])
    made = macvtap(node, IDS[0])
    assert made is not None
    [device] = kubelet.start_container("vm3", "compute").devices
    assert device.type == "c" and device.host_path == f"/dev/tap{made['ifindex']}"
