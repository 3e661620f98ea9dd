"""The servicer over a real gRPC unix socket, with a fake allocator (no kernel needed)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from harness.processes import until
from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from macvtapdp.config import Resource
from macvtapdp.errors import AllocationError, LinkMissingError, LowerLinkBusy
from macvtapdp.plugin.allocator import Allocation
from macvtapdp.plugin.health import Health
from macvtapdp.plugin.kubelet import SERVER_OPTIONS, WORKERS
from macvtapdp.plugin.servicer import MAX_STREAMS, DevicePluginServicer

RESOURCE = Resource("eth0", "eth0", capacity=3)
IDS = ["eth0Mvp0", "eth0Mvp1", "eth0Mvp2"]


@dataclass
class FakeAllocator:
    calls: list[list[str]] = field(default_factory=list)
    pre_starts: list[list[str]] = field(default_factory=list)
    fail: Exception | None = None

    def allocate(self, device_ids: Sequence[str]) -> list[Allocation]:
        self.calls.append(list(device_ids))
        if self.fail:
            raise self.fail
        return [
            Allocation(i, f"/dev/tap{100 + IDS.index(i)}", created=True, seconds=0.001)
            for i in device_ids
        ]

    def pre_start(self, device_ids: Sequence[str]) -> list[str]:
        self.pre_starts.append(list(device_ids))
        if self.fail:
            raise self.fail
        return [f"{i}: fine" for i in device_ids]


@dataclass
class Served:
    stub: api_pb2_grpc.DevicePluginStub
    health: Health
    allocator: FakeAllocator
    servicer: DevicePluginServicer


@pytest.fixture
def served() -> Iterator[Served]:
    workdir = tempfile.mkdtemp(prefix="mdp", dir="/tmp")
    health, allocator = Health(), FakeAllocator()
    health.set(healthy=True, reason="up")
    servicer = DevicePluginServicer(RESOURCE, health, allocator)
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS), options=SERVER_OPTIONS)
    api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, server)
    path = os.path.join(workdir, "plugin.sock")
    server.add_insecure_port(f"unix:{path}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{path}")
    try:
        yield Served(api_pb2_grpc.DevicePluginStub(channel), health, allocator, servicer)
    finally:
        health.close()
        channel.close()
        server.stop(None).wait()
        shutil.rmtree(workdir)


def healths(response: api_pb2.ListAndWatchResponse) -> dict[str, str]:
    return {d.ID: d.health for d in response.devices}


def test_options_ask_for_pre_start_container(served: Served) -> None:
    """PreStartContainer before every container start checks the paths Allocate gave."""
    options = served.stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
    assert options.pre_start_required and not options.get_preferred_allocation_available


def test_list_and_watch_sends_the_full_list_then_every_flip(served: Served) -> None:
    stream = served.stub.ListAndWatch(api_pb2.Empty(), timeout=10)
    assert healths(next(stream)) == dict.fromkeys(IDS, "Healthy")
    served.health.set(healthy=False, reason="down")
    assert healths(next(stream)) == dict.fromkeys(IDS, "Unhealthy")
    served.health.set(healthy=False, reason="missing")  # same health: no message
    served.health.set(healthy=True, reason="up")
    assert healths(next(stream)) == dict.fromkeys(IDS, "Healthy")
    stream.cancel()


def test_unhealthy_link_still_sends_the_list_at_once(served: Served) -> None:
    served.health.set(healthy=False, reason="missing")
    stream = served.stub.ListAndWatch(api_pb2.Empty(), timeout=10)
    assert healths(next(stream)) == dict.fromkeys(IDS, "Unhealthy")
    stream.cancel()


def test_numa_nodes_are_sent_as_topology_and_followed(served: Served) -> None:
    stream = served.stub.ListAndWatch(api_pb2.Empty(), timeout=10)
    assert all(not d.HasField("topology") for d in next(stream).devices)
    served.health.set(numa_nodes=(1,))
    update = next(stream)
    assert [[n.ID for n in d.topology.nodes] for d in update.devices] == [[1]] * 3
    assert healths(update) == dict.fromkeys(IDS, "Healthy")
    served.health.set(numa_nodes=None)
    assert all(not d.HasField("topology") for d in next(stream).devices)
    stream.cancel()


def test_close_ends_streams_cleanly(served: Served) -> None:
    stream = served.stub.ListAndWatch(api_pb2.Empty(), timeout=10)
    next(stream)
    served.health.close()
    assert list(stream) == []  # ended with OK, not an error


def test_cancelled_streams_release_their_worker(served: Served) -> None:
    for _ in range(3 * MAX_STREAMS):
        stream = served.stub.ListAndWatch(api_pb2.Empty(), timeout=10)
        next(stream)
        stream.cancel()
    assert until(lambda: served.servicer._streams == 0, 5.0)


def test_streams_are_capped_and_never_starve_allocate(served: Served) -> None:
    streams = [served.stub.ListAndWatch(api_pb2.Empty(), timeout=10) for _ in range(MAX_STREAMS)]
    for stream in streams:
        next(stream)
    extra = served.stub.ListAndWatch(api_pb2.Empty(), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        next(extra)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["eth0Mvp1"])]
    )
    assert served.stub.Allocate(request, timeout=2).container_responses
    for stream in streams:
        stream.cancel()


def allocate(served: Served, *containers: list[str]) -> api_pb2.AllocateResponse:
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=c) for c in containers]
    )
    response: api_pb2.AllocateResponse = served.stub.Allocate(request, timeout=5)
    return response


def test_allocate_returns_tap_devices_per_container(served: Served) -> None:
    response = allocate(served, ["eth0Mvp0", "eth0Mvp2"], ["eth0Mvp1"])
    [first, second] = response.container_responses
    assert [(d.host_path, d.container_path, d.permissions) for d in first.devices] == [
        ("/dev/tap100", "/dev/tap100", "rw"),
        ("/dev/tap102", "/dev/tap102", "rw"),
    ]
    assert [d.host_path for d in second.devices] == ["/dev/tap101"]
    assert served.allocator.calls == [["eth0Mvp0", "eth0Mvp2", "eth0Mvp1"]]


@pytest.mark.parametrize(
    ("containers", "code", "message"),
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "Allocate request has no container requests"),
        ([[]], grpc.StatusCode.INVALID_ARGUMENT, "container request 0 has no device IDs"),
        (
            [["eth0Mvp0", "eth1Mvp0"]],
            grpc.StatusCode.NOT_FOUND,
            'unknown device IDs for macvtap.network.kubevirt.io/eth0: "eth1Mvp0"',
        ),
        (
            [[f"x{i}" for i in range(10_000)]],
            grpc.StatusCode.INVALID_ARGUMENT,
            "10000 device IDs asked; macvtap.network.kubevirt.io/eth0 has 3 devices",
        ),
        (
            [["eth0Mvp0"], ["eth0Mvp0"]],
            grpc.StatusCode.INVALID_ARGUMENT,
            'device IDs asked twice: "eth0Mvp0"',
        ),
        (
            [["eth0Mvp0", "eth0Mvp1"], ["eth0Mvp2", "eth0Mvp0"]],
            grpc.StatusCode.INVALID_ARGUMENT,
            "4 device IDs asked; macvtap.network.kubevirt.io/eth0 has 3 devices",
        ),
        (
            [["eth0Mvp0\n2026-01-01 INFO [other] forged"]],
            grpc.StatusCode.NOT_FOUND,
            "unknown device IDs for macvtap.network.kubevirt.io/eth0: "
            '"eth0Mvp0\\n2026-01-01 INFO [other] forged"',
        ),
        (
            [["y" * 800_000]],
            grpc.StatusCode.NOT_FOUND,
            f'unknown device IDs for macvtap.network.kubevirt.io/eth0: "{"y" * 64}"... '
            f"({800_000 - 64} more characters)",
        ),
    ],
)
def test_bad_requests_are_refused_before_anything_is_made(
    served: Served, containers: list[list[str]], code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        allocate(served, *containers)
    assert caught.value.code() == code
    assert caught.value.details() == message
    assert served.allocator.calls == []


def test_what_is_logged_of_a_hostile_request_is_quoted_and_cut(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(grpc.RpcError):
        allocate(served, ["x\ny" + "z" * 100_000] * 3)
    [line] = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and len(line) < 400


def test_an_oversized_request_gets_one_clear_status(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        allocate(served, ["q" * (2 << 20)])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.allocator.calls == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (LinkMissingError("lower link eth0 does not exist"), grpc.StatusCode.FAILED_PRECONDITION),
        (AllocationError("cannot make macvtap"), grpc.StatusCode.INTERNAL),
        (
            LowerLinkBusy("held by eth0Mvp0's", "eth0Mvp0", passthru=True),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (LowerLinkBusy("a port of a bridge"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_allocation_failures_become_status_codes(
    served: Served, error: Exception, code: grpc.StatusCode
) -> None:
    served.allocator.fail = error
    with pytest.raises(grpc.RpcError) as caught:
        allocate(served, ["eth0Mvp0"])
    assert caught.value.code() == code
    assert caught.value.details() == str(error)


def test_pre_start_checks_the_devices_and_refuses_a_wrong_one(served: Served) -> None:
    request = api_pb2.PreStartContainerRequest(devices_ids=["eth0Mvp0"])
    assert served.stub.PreStartContainer(request, timeout=5) == api_pb2.PreStartContainerResponse()
    assert served.allocator.pre_starts == [["eth0Mvp0"]]
    served.allocator.fail = AllocationError("eth0Mvp0: /dev/tap100 is now another device's")
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.PreStartContainer(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.PreStartContainer(
            api_pb2.PreStartContainerRequest(devices_ids=["eth1Mvp0"]), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_preferred_allocation_keeps_required_devices(served: Served) -> None:
    request = api_pb2.PreferredAllocationRequest(
        container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=IDS, must_include_deviceIDs=["eth0Mvp2"], allocation_size=2
            )
        ]
    )
    [answer] = served.stub.GetPreferredAllocation(request, timeout=5).container_responses
    assert list(answer.deviceIDs) == ["eth0Mvp2", "eth0Mvp0"]


def test_health_waiters_wake_on_close() -> None:
    health = Health()
    active = threading.Event()
    active.set()
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(health.wait(0, active)))
    waiter.start()
    health.close()
    waiter.join(2)
    assert result == [None]
