"""Self-tests of the kubelet stand-in (tests/kubelet.py) against a tiny in-test device plugin.

The plugin here is written with grpc directly, not with macvtapdp, so these tests check the
stand-in alone. No root, no network namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import grpc
import pytest

from harness.kubelet import (
    CHECKPOINT,
    HEALTHY,
    KUBELET_SOCKET,
    OPTIONS_FROM_PLUGIN,
    OPTIONS_FROM_REGISTER,
    RATE_LIMITED,
    UNHEALTHY,
    AdmissionError,
    ContainerStartError,
    FakeKubelet,
    KubeletError,
    Order,
    ResourceState,
    StartedDevice,
    is_extended_resource_name,
)
from harness.processes import until
from macvtapdp.api.podresources.v1 import api_pb2 as pr_pb2
from macvtapdp.api.podresources.v1 import api_pb2_grpc as pr_grpc
from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "example.com/tiny"
WAIT = 5.0


class TinyPlugin(api_pb2_grpc.DevicePluginServicer):
    """A minimal device plugin serving ``<plugin_dir>/<endpoint>``."""

    def __init__(
        self,
        plugin_dir: str,
        endpoint: str,
        devices: dict[str, str] | None = None,
        *,
        options: api_pb2.DevicePluginOptions | None = None,
        options_delay: float = 0.0,
        options_error: grpc.StatusCode | None = None,
        host_paths: dict[str, str] | None = None,
        allocate_error: grpc.StatusCode | None = None,
        pre_start_error: grpc.StatusCode | None = None,
        preferred: list[str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.path = os.path.join(plugin_dir, endpoint)
        self.options = options or api_pb2.DevicePluginOptions()
        self.options_delay = options_delay
        self.options_error = options_error
        self.host_paths = host_paths or {}  # device ID -> DeviceSpec.host_path (else /dev/<ID>)
        self.allocate_error = allocate_error
        self.pre_start_error = pre_start_error
        self.preferred = preferred
        self.options_calls: list[float] = []  # time.monotonic() of each GetDevicePluginOptions
        self.allocate_requests: list[api_pb2.AllocateRequest] = []
        self.pre_start_requests: list[api_pb2.PreStartContainerRequest] = []
        self.pre_start_times: list[float] = []
        self.preferred_requests: list[api_pb2.PreferredAllocationRequest] = []
        self.streams_started = 0
        self.streams_ended = 0
        self._cond = threading.Condition()
        self._devices = dict(devices or {})
        self._version = 0
        self._end_epoch = 0
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(8)
        self._server = grpc.server(self._executor)
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, self._server)
        self._server.add_insecure_port("unix:" + self.path)
        self._server.start()

    def push(self, devices: dict[str, str]) -> None:
        """Send a new full snapshot on every open stream."""
        with self._cond:
            self._devices = dict(devices)
            self._version += 1
            self._cond.notify_all()

    def end_streams(self) -> None:
        """Return from every open ListAndWatch, as a plugin that gives up would."""
        with self._cond:
            self._end_epoch += 1
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self._closing.set()
        self.end_streams()
        self._server.stop(None).wait()
        self._executor.shutdown(wait=True)

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        self.options_calls.append(time.monotonic())
        self._closing.wait(self.options_delay)
        if self.options_error is not None:
            context.abort(self.options_error, "no options today")
        return self.options

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        cancelled = threading.Event()

        def on_done() -> None:
            cancelled.set()
            with self._cond:
                self._cond.notify_all()

        context.add_callback(on_done)
        with self._cond:
            self.streams_started += 1
            epoch, sent = self._end_epoch, -1
            self._cond.notify_all()
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(partial(self._wake, cancelled, epoch, sent))
                    if cancelled.is_set() or self._end_epoch != epoch:
                        return
                    sent, devices = self._version, dict(self._devices)
                yield api_pb2.ListAndWatchResponse(
                    devices=[api_pb2.Device(ID=i, health=h) for i, h in devices.items()]
                )
        finally:
            with self._cond:
                self.streams_ended += 1
                self._cond.notify_all()

    def _wake(self, cancelled: threading.Event, epoch: int, sent: int) -> bool:
        return cancelled.is_set() or self._end_epoch != epoch or self._version != sent

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        self.preferred_requests.append(request)
        if self.preferred is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "not offered")
        return api_pb2.PreferredAllocationResponse(
            container_responses=[
                api_pb2.ContainerPreferredAllocationResponse(deviceIDs=self.preferred)
            ]
        )

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        self.allocate_requests.append(request)
        if self.allocate_error is not None:
            context.abort(self.allocate_error, "no devices today")
        return api_pb2.AllocateResponse(
            container_responses=[
                api_pb2.ContainerAllocateResponse(
                    envs={f"TINY_{i}": "1" for i in c.devices_ids},
                    devices=[
                        api_pb2.DeviceSpec(
                            host_path=self.host_paths.get(i, f"/dev/{i}"),
                            container_path=f"/dev/{i}",
                            permissions="rw",
                        )
                        for i in c.devices_ids
                    ],
                )
                for c in request.container_requests
            ]
        )

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        self.pre_start_requests.append(request)
        self.pre_start_times.append(time.monotonic())
        if self.pre_start_error is not None:
            context.abort(self.pre_start_error, "device not ready")
        return api_pb2.PreStartContainerResponse()


def register(
    kubelet: FakeKubelet,
    endpoint: str,
    resource: str = RESOURCE,
    version: str = "v1beta1",
    options: api_pb2.DevicePluginOptions | None = None,
) -> None:
    """Register as a plugin does, over kubelet.sock."""
    with grpc.insecure_channel("unix:" + kubelet.socket_path) as channel:
        request = api_pb2.RegisterRequest(
            version=version, endpoint=endpoint, resource_name=resource, options=options
        )
        api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=20)


def register_error(
    kubelet: FakeKubelet, endpoint: str, resource: str = RESOURCE, version: str = "v1beta1"
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        register(kubelet, endpoint, resource, version)
    return info.value


def details(err: grpc.RpcError) -> tuple[grpc.StatusCode, str | None]:
    assert isinstance(err, grpc.Call)
    return err.code(), err.details()


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mdp", dir="/tmp")  # unix socket paths: <= 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hold_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mdp", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kubelet(plugin_dir: str) -> Iterator[FakeKubelet]:
    with FakeKubelet(plugin_dir) as k:
        yield k


@pytest.fixture
def plugins(plugin_dir: str) -> Iterator[Callable[..., TinyPlugin]]:
    """Factory of TinyPlugins in the plugin dir, all closed at the end."""
    made: list[TinyPlugin] = []

    def make(endpoint: str = "tiny.sock", **kwargs: Any) -> TinyPlugin:
        plugin = TinyPlugin(plugin_dir, endpoint, **kwargs)
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        plugin.close()


def connected_with(allocatable: int) -> Callable[[ResourceState], bool]:
    return lambda s: s.connected and s.allocatable == allocatable


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("macvtap.network.kubevirt.io/dataplane", True),
        ("example.com/foo", True),
        ("example.com/Foo_bar.1", True),
        ("example.com/" + "a" * 63, True),
        ("example.com/" + "a" * 64, False),
        ("a" * (253 - len("requests.")) + "/x", True),
        ("a" * (254 - len("requests.")) + "/x", False),
        ("nodomain", False),
        ("kubernetes.io/foo", False),
        ("foo.kubernetes.io/bar", False),
        ("requests.x/y", False),
        ("Example.com/foo", False),
        ("example.com/", False),
        ("/foo", False),
        ("a/b/c", False),
        ("example.com/-foo", False),
        ("example.com/foo\n", False),
    ],
)
def test_is_extended_resource_name(name: str, ok: bool) -> None:
    assert is_extended_resource_name(name) is ok


def test_register_dials_back_and_asks_options_before_answering(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = plugins(
        options=api_pb2.DevicePluginOptions(pre_start_required=True), options_delay=0.2
    )
    before = time.monotonic()
    register(kubelet, "tiny.sock", options=api_pb2.DevicePluginOptions())
    answered = time.monotonic()

    assert len(plugin.options_calls) == 1
    assert before < plugin.options_calls[0] < answered
    assert answered - before >= 0.2  # Register waited for GetDevicePluginOptions
    state = kubelet.state(RESOURCE)
    assert state.registered and state.connected and state.register_count == 1
    assert state.endpoint == "tiny.sock"
    assert state.options is not None and state.options.pre_start_required  # the answer wins
    assert state.options_source == OPTIONS_FROM_PLUGIN
    [reg] = kubelet.registrations
    assert (reg.version, reg.endpoint, reg.resource_name) == ("v1beta1", "tiny.sock", RESOURCE)
    assert reg.options is not None and not reg.options.pre_start_required
    assert reg.error is None and reg.done
    assert plugin.wait(lambda: plugin.streams_started == 1)  # ListAndWatch follows on its own


def test_bad_version_refused(kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]) -> None:
    plugin = plugins()
    err = register_error(kubelet, "tiny.sock", version="v1alpha1")
    assert details(err) == (
        grpc.StatusCode.UNKNOWN,
        'requested API version "v1alpha1" is not supported by kubelet. '
        'Supported version is ["v1beta1"]',
    )
    assert plugin.options_calls == []
    assert not kubelet.state(RESOURCE).registered
    assert kubelet.registrations[0].error == details(err)[1]


@pytest.mark.parametrize("name", ["kubernetes.io/foo", "nodomain", "requests.x/y"])
def test_bad_resource_name_refused(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin], name: str
) -> None:
    plugin = plugins()
    err = register_error(kubelet, "tiny.sock", resource=name)
    assert details(err) == (grpc.StatusCode.UNKNOWN, f'the ResourceName "{name}" is invalid')
    assert plugin.options_calls == []


@pytest.mark.parametrize("endpoint", ["", "../x.sock", "sub/x.sock"])
def test_endpoint_must_be_a_file_name(kubelet: FakeKubelet, endpoint: str) -> None:
    err = register_error(kubelet, endpoint)
    assert "is not a file name in the plugin directory" in str(details(err)[1])


def test_unreachable_endpoint_refused(plugin_dir: str) -> None:
    with FakeKubelet(plugin_dir, dial_timeout=0.3) as kubelet:
        start = time.monotonic()
        err = register_error(kubelet, "nobody.sock")
        assert time.monotonic() - start >= 0.3  # a blocking dial, retried until the timeout
        assert details(err) == (
            grpc.StatusCode.UNKNOWN,
            "failed to dial device plugin: context deadline exceeded",
        )
        assert not kubelet.state(RESOURCE).registered


def test_options_error_refused(kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]) -> None:
    plugins(options_error=grpc.StatusCode.INTERNAL)
    err = register_error(kubelet, "tiny.sock")
    assert details(err) == (
        grpc.StatusCode.UNKNOWN,
        "failed to get device plugin options: rpc error: code = Internal desc = no options today",
    )
    assert not kubelet.state(RESOURCE).registered


def test_start_removes_unix_sockets_only(plugin_dir: str) -> None:
    def make_socket(path: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)

    make_socket(os.path.join(plugin_dir, "stale.sock"))
    make_socket(os.path.join(plugin_dir, CHECKPOINT))  # skipped by name, even as a socket
    with open(os.path.join(plugin_dir, "notes.txt"), "w") as f:
        f.write("kept")
    os.mkdir(os.path.join(plugin_dir, "sub"))
    make_socket(os.path.join(plugin_dir, "sub", "nested.sock"))  # not recursed into

    with FakeKubelet(plugin_dir) as kubelet:
        assert sorted(os.listdir(plugin_dir)) == sorted(
            [CHECKPOINT, "notes.txt", "sub", KUBELET_SOCKET]
        )
        assert os.listdir(os.path.join(plugin_dir, "sub")) == ["nested.sock"]
        assert kubelet.running
    assert not os.path.exists(os.path.join(plugin_dir, KUBELET_SOCKET))


def test_start_creates_missing_dir(plugin_dir: str) -> None:
    nested = os.path.join(plugin_dir, "dp")
    with FakeKubelet(nested):
        assert os.stat(nested).st_mode & 0o777 == 0o750 & ~_umask()
        assert os.path.exists(os.path.join(nested, KUBELET_SOCKET))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_snapshots_update_capacity_and_allocatable(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = plugins(devices={"a": HEALTHY, "b": HEALTHY})
    register(kubelet, "tiny.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(2), WAIT)

    plugin.push({"a": HEALTHY, "b": UNHEALTHY, "c": "healthy"})  # only "Healthy" counts
    assert kubelet.wait_for(RESOURCE, lambda s: s.capacity == 3 and s.allocatable == 1, WAIT)
    plugin.push({"a": HEALTHY})  # a full snapshot: absent devices vanish
    assert kubelet.wait_for(RESOURCE, lambda s: s.devices == {"a": HEALTHY}, WAIT)
    plugin.push({})  # still registered, nothing to offer
    assert kubelet.wait_for(RESOURCE, lambda s: s.capacity == 0 and s.connected, WAIT)

    snapshots = [devices for _, devices in kubelet.history(RESOURCE)]
    assert snapshots == [
        {"a": HEALTHY, "b": HEALTHY},
        {"a": HEALTHY, "b": UNHEALTHY, "c": "healthy"},
        {"a": HEALTHY},
        {},
    ]
    times = [t for t, _ in kubelet.history(RESOURCE)]
    assert times == sorted(times)
    assert not kubelet.wait_for(RESOURCE, lambda s: s.capacity == 7, 0.05)


def test_stream_end_makes_devices_unhealthy(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = plugins(devices={"a": HEALTHY, "b": HEALTHY, "c": UNHEALTHY})
    register(kubelet, "tiny.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(2), WAIT)

    before = time.monotonic()
    plugin.end_streams()
    assert kubelet.wait_for(RESOURCE, lambda s: not s.connected, WAIT)
    state = kubelet.state(RESOURCE)
    assert (state.capacity, state.allocatable) == (3, 0)
    assert state.registered and state.stopped_at is not None and state.stopped_at >= before
    with pytest.raises(KubeletError, match="has been stopped"):
        kubelet.allocate(RESOURCE, ["a"])

    time.sleep(0.2)  # the kubelet never dials again by itself
    assert plugin.streams_started == 1
    register(kubelet, "tiny.sock")  # only a new Register reconnects
    assert kubelet.wait_for(RESOURCE, connected_with(2), WAIT)
    assert plugin.streams_started == 2
    assert kubelet.state(RESOURCE).register_count == 2


def test_newest_registration_wins(kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]) -> None:
    old = plugins("old.sock", devices={"a": HEALTHY, "b": HEALTHY})
    register(kubelet, "old.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(2), WAIT)

    new = plugins("new.sock", devices={"x": HEALTHY, "y": HEALTHY, "z": HEALTHY})
    register(kubelet, "new.sock")
    assert old.wait(lambda: old.streams_ended == 1)  # the old client was closed
    assert kubelet.wait_for(RESOURCE, connected_with(3), WAIT)
    # The old stream's late end was seen, and ignored: the new endpoint is untouched.
    assert until(lambda: any(e.kind == "stream-ended" for e in kubelet.events), WAIT)
    old.push({"a": UNHEALTHY})
    old.close()
    time.sleep(0.1)
    state = kubelet.state(RESOURCE)
    assert state.connected and state.endpoint == "new.sock" and state.allocatable == 3
    assert state.register_count == 2

    kubelet.allocate(RESOURCE, ["x"])
    assert len(new.allocate_requests) == 1 and old.allocate_requests == []
    new.push({"x": UNHEALTHY, "y": HEALTHY, "z": HEALTHY})
    assert kubelet.wait_for(RESOURCE, connected_with(2), WAIT)


def test_restart_deletes_plugin_sockets_and_makes_a_new_kubelet_socket(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin], hold_dir: str
) -> None:
    plugin = plugins(devices={"a": HEALTHY})
    register(kubelet, "tiny.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(1), WAIT)
    # ext4 hands a freed inode number out again at once, as it would to a real kubelet:
    # hold the old socket's inode with a hard link to see that kubelet.sock is a new file.
    held = os.path.join(hold_dir, "old-kubelet.sock")
    os.link(kubelet.socket_path, held)

    kubelet.restart()
    assert not os.path.exists(plugin.path)
    assert os.stat(held).st_nlink == 1  # the old kubelet.sock was unlinked
    assert os.stat(kubelet.socket_path).st_ino != os.stat(held).st_ino
    assert plugin.wait(lambda: plugin.streams_ended == 1)  # the dying kubelet dropped the stream
    state = kubelet.state(RESOURCE)
    assert not state.registered and not state.connected and state.capacity == 0

    plugins("tiny2.sock", devices={"a": HEALTHY})  # a plugin serves again and re-registers
    register(kubelet, "tiny2.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(1), WAIT)
    assert kubelet.state(RESOURCE).register_count == 2


def test_stop_interrupts_a_register_in_flight(
    plugin_dir: str, plugins: Callable[..., TinyPlugin]
) -> None:
    kubelet = FakeKubelet(plugin_dir)
    kubelet.start()
    plugin = plugins(options_delay=30.0)
    errors: list[grpc.RpcError] = []

    def attempt() -> None:
        try:
            register(kubelet, "tiny.sock")
        except grpc.RpcError as err:
            errors.append(err)

    thread = threading.Thread(target=attempt)
    thread.start()
    assert until(lambda: bool(plugin.options_calls), WAIT)
    start = time.monotonic()
    kubelet.stop()
    assert time.monotonic() - start < 2.0
    thread.join(WAIT)
    assert not thread.is_alive() and len(errors) == 1
    assert not kubelet.state(RESOURCE).registered


def test_allocate_round_trip(kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]) -> None:
    plugin = plugins(devices={"a": HEALTHY, "b": HEALTHY})
    register(kubelet, "tiny.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(2), WAIT)

    response = kubelet.allocate(RESOURCE, ["a", "b"])
    [container] = response.container_responses
    assert [d.host_path for d in container.devices] == ["/dev/a", "/dev/b"]
    [request] = plugin.allocate_requests
    assert [list(c.devices_ids) for c in request.container_requests] == [["a", "b"]]

    assert not kubelet.call_allocate(RESOURCE, [], timeout=WAIT).container_responses
    two = kubelet.call_allocate(RESOURCE, [["a"], ["b"]], timeout=WAIT)
    assert len(two.container_responses) == 2
    assert [len(r.container_requests) for r in plugin.allocate_requests] == [1, 0, 2]

    kubelet.pre_start(RESOURCE, ["a"])
    assert [list(r.devices_ids) for r in plugin.pre_start_requests] == [["a"]]
    assert kubelet.get_options(RESOURCE) == api_pb2.DevicePluginOptions()
    with pytest.raises(KubeletError, match="unknown Device Plugin"):
        kubelet.allocate("example.com/other", ["a"])


@pytest.mark.parametrize("order", ["sync", "legacy"])
def test_no_threads_left_after_stop(
    plugin_dir: str, plugins: Callable[..., TinyPlugin], hold_dir: str, order: Order
) -> None:
    baseline = set(threading.enumerate())
    kubelet = FakeKubelet(
        plugin_dir, order=order, pod_resources_socket=os.path.join(hold_dir, "pr.sock")
    )
    for _ in range(3):
        kubelet.start()
        first = plugins("one.sock", devices={"a": HEALTHY})
        register(kubelet, "one.sock")
        second = plugins("two.sock", devices={"a": HEALTHY})
        register(kubelet, "two.sock")  # replaces the first
        assert kubelet.wait_for(RESOURCE, connected_with(1), WAIT)
        kubelet.allocate(RESOURCE, ["a"])
        kubelet.admit("pod", "c", RESOURCE, 1)
        with pod_resources(kubelet) as lister:
            lister.List(pr_pb2.ListPodResourcesRequest(), timeout=WAIT)
        kubelet.remove_pod("pod")
        kubelet.stop()
        first.close()
        second.close()
    assert not kubelet.running
    assert until(lambda: set(threading.enumerate()) <= baseline, WAIT), threading.enumerate()


# -- pods and containers ---------------------------------------------------------------------


def serving(
    kubelet: FakeKubelet,
    plugins: Callable[..., TinyPlugin],
    devices: dict[str, str],
    **kwargs: Any,
) -> TinyPlugin:
    """A registered TinyPlugin whose first snapshot has arrived."""
    plugin = plugins(devices=devices, **kwargs)
    register(kubelet, plugin.endpoint, options=kwargs.get("options"))
    healthy = sum(1 for h in devices.values() if h == HEALTHY)
    assert kubelet.wait_for(RESOURCE, connected_with(healthy), WAIT)
    return plugin


def test_admit_picks_healthy_free_devices_and_keeps_the_answer(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = serving(kubelet, plugins, {"a": HEALTHY, "b": UNHEALTHY, "c": HEALTHY})

    first = kubelet.admit("p1", "app", RESOURCE, 1)
    second = kubelet.admit("p2", "app", RESOURCE, 1, namespace="other")
    assert [d.container_path for d in first.devices] == ["/dev/a"]
    assert [d.container_path for d in second.devices] == ["/dev/c"]  # never the unhealthy b
    assert [
        [list(c.devices_ids) for c in r.container_requests] for r in plugin.allocate_requests
    ] == [
        [["a"]],
        [["c"]],
    ]
    assert kubelet.allocated(RESOURCE) == {"a", "c"}
    held = kubelet.allocation("p1", "app", RESOURCE)
    assert held is not None and held == (["a"], first)

    with pytest.raises(AdmissionError, match=r"Requested: 1, Available: 0"):
        kubelet.admit("p3", "app", RESOURCE, 1)
    assert len(plugin.allocate_requests) == 2  # refused before any call
    with pytest.raises(AdmissionError, match="is not active"):  # a rejected pod stays rejected
        kubelet.admit("p3", "app", RESOURCE, 1)
    with pytest.raises(AdmissionError, match="cannot allocate unregistered device"):
        kubelet.admit("p4", "app", "example.com/other", 1)


def test_admit_again_reuses_the_cached_answer(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = serving(kubelet, plugins, {"a": HEALTHY, "b": HEALTHY})
    first = kubelet.admit("p1", "app", RESOURCE, ["b"])
    assert kubelet.admit("p1", "app", RESOURCE, 1) == first  # no work: no Allocate
    assert len(plugin.allocate_requests) == 1
    with pytest.raises(AdmissionError, match=r'changed request for resource "example\.com/tiny"'):
        kubelet.admit("p1", "app", RESOURCE, 2)
    # The rejected p1 is not active: the next UpdateAllocatedDevices frees its b.
    kubelet.admit("p2", "app", RESOURCE, ["b"])
    with pytest.raises(AdmissionError, match="not healthy and free"):
        kubelet.admit("p3", "app", RESOURCE, ["b"])
    assert kubelet.allocated(RESOURCE) == {"b"}


def test_removed_pod_frees_its_devices_without_telling_the_plugin(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = serving(kubelet, plugins, {"a": HEALTHY})
    kubelet.admit("p1", "app", RESOURCE, 1)
    with pytest.raises(AdmissionError, match="Available: 0"):
        kubelet.admit("p2", "app", RESOURCE, 1)

    kubelet.remove_pod("p1")
    kubelet.admit("p3", "app", RESOURCE, 1)  # a again
    requests = [list(r.container_requests[0].devices_ids) for r in plugin.allocate_requests]
    assert requests == [["a"], ["a"]]
    assert plugin.pre_start_requests == [] and plugin.preferred_requests == []
    assert kubelet.allocated(RESOURCE) == {"a"}


def test_admit_asks_for_a_preferred_allocation_when_offered(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    options = api_pb2.DevicePluginOptions(get_preferred_allocation_available=True)
    plugin = serving(
        kubelet, plugins, dict.fromkeys("abcd", HEALTHY), options=options, preferred=["d", "zz"]
    )
    kubelet.admit("p0", "app", RESOURCE, ["a"])
    response = kubelet.admit("p1", "app", RESOURCE, 2)
    # The preferred IDs that are available first (zz is not), then the rest in snapshot order.
    assert [d.container_path for d in response.devices] == ["/dev/d", "/dev/b"]
    [request] = plugin.preferred_requests  # none for the explicit IDs
    [container] = request.container_requests
    assert list(container.available_deviceIDs) == ["b", "c", "d"]
    assert list(container.must_include_deviceIDs) == []
    assert container.allocation_size == 2


def test_failed_allocate_rejects_the_pod_and_holds_nothing(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    serving(kubelet, plugins, {"a": HEALTHY}, allocate_error=grpc.StatusCode.INTERNAL)
    with pytest.raises(AdmissionError) as info:
        kubelet.admit("p1", "app", RESOURCE, 1)
    assert str(info.value) == (
        "Allocate failed due to rpc error: code = Internal desc = no devices today, "
        "which is unexpected"
    )
    assert kubelet.allocated(RESOURCE) == set()
    with pytest.raises(ContainerStartError, match="not active"):
        kubelet.start_container("p1", "app")


def test_start_container_stats_the_host_path_at_every_start(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin], hold_dir: str
) -> None:
    link = os.path.join(hold_dir, "tap-a")
    os.symlink("/dev/null", link)
    plugin = serving(kubelet, plugins, {"a": HEALTHY}, host_paths={"a": link})
    kubelet.admit("p1", "app", RESOURCE, 1)

    first = kubelet.start_container("p1", "app")
    null, zero = os.stat("/dev/null").st_rdev, os.stat("/dev/zero").st_rdev
    assert first.devices == (
        StartedDevice("/dev/a", link, "rw", "c", os.major(null), os.minor(null)),
    )
    assert first.envs == {"TINY_a": "1"} and first.attempt == 0 and first.error is None

    os.remove(link)  # the node changes under the same host path
    os.symlink("/dev/zero", link)
    again = kubelet.restart_container("p1", "app")
    assert [(d.major, d.minor) for d in again.devices] == [(os.major(zero), os.minor(zero))]
    assert again.attempt == 1
    assert len(plugin.allocate_requests) == 1  # starts never call Allocate
    assert plugin.pre_start_requests == []  # not required by the options
    assert [s.attempt for s in kubelet.starts] == [0, 1]


@pytest.mark.parametrize("kind", ["missing", "regular file", "directory", "fifo"])
def test_start_container_fails_without_a_device_node(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin], hold_dir: str, kind: str
) -> None:
    path = os.path.join(hold_dir, "node")
    if kind == "regular file":
        with open(path, "w") as f:
            f.write("not a device")
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    serving(
        kubelet, plugins, {"a": HEALTHY, "b": HEALTHY}, host_paths={"a": "/dev/null", "b": path}
    )
    kubelet.admit("p1", "app", RESOURCE, 2)

    with pytest.raises(ContainerStartError) as info:
        kubelet.start_container("p1", "app")
    expected = {
        "missing": f"error stating device path: stat {path}: no such file or directory",
        "regular file": (
            f'get device path: "{path}" containerPath: "/dev/b" error: not a device node'
        ),
        "directory": "is a directory",
        "fifo": "not a device node",
    }[kind]
    assert expected in str(info.value)
    [failed] = kubelet.starts
    assert failed.error == str(info.value) and failed.devices == ()

    if kind == "directory":
        os.rmdir(path)
    elif kind != "missing":
        os.remove(path)
    os.symlink("/dev/zero", path)  # the node appears: the next start works
    started = kubelet.start_container("p1", "app")
    assert [(d.host_path, d.type) for d in started.devices] == [("/dev/null", "c"), (path, "c")]
    assert started.attempt == 1


def test_pre_start_container_before_every_start_when_required(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    options = api_pb2.DevicePluginOptions(pre_start_required=True)
    plugin = serving(
        kubelet, plugins, {"a": HEALTHY}, options=options, host_paths={"a": "/dev/null"}
    )
    kubelet.admit("p1", "app", RESOURCE, 1)
    assert plugin.pre_start_requests == []  # not at admission

    results = []
    for _ in range(3):
        before = time.monotonic()
        results.append(kubelet.start_container("p1", "app"))
        assert before < plugin.pre_start_times[-1]  # called during this start
    assert [list(r.devices_ids) for r in plugin.pre_start_requests] == [["a"]] * 3
    assert all(r.pre_started == (RESOURCE,) for r in results)
    assert len(plugin.allocate_requests) == 1

    plugin.pre_start_error = grpc.StatusCode.UNAVAILABLE  # an error fails the start
    with pytest.raises(ContainerStartError) as info:
        kubelet.restart_container("p1", "app")
    assert str(info.value) == (
        "device plugin PreStartContainer rpc failed with err: "
        "rpc error: code = Unavailable desc = device not ready"
    )


def test_start_with_a_stopped_endpoint(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    """The cached answer still serves a start; only a required PreStartContainer fails."""
    plain = serving(kubelet, plugins, {"a": HEALTHY}, host_paths={"a": "/dev/null"})
    kubelet.admit("p1", "app", RESOURCE, 1)
    plain.end_streams()
    assert kubelet.wait_for(RESOURCE, lambda s: not s.connected, WAIT)
    assert [d.host_path for d in kubelet.start_container("p1", "app").devices] == ["/dev/null"]

    options = api_pb2.DevicePluginOptions(pre_start_required=True)
    needy = plugins("needy.sock", devices={"a": HEALTHY}, options=options)
    register(kubelet, "needy.sock")
    assert kubelet.wait_for(RESOURCE, connected_with(1), WAIT)
    needy.end_streams()
    assert kubelet.wait_for(RESOURCE, lambda s: not s.connected, WAIT)
    with pytest.raises(ContainerStartError, match=r"endpoint example\.com/tiny has been stopped"):
        kubelet.start_container("p1", "app")


def test_pods_outlive_a_kubelet_restart(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    """The checkpoint keeps the answers; the restored endpoint has no options (no PreStart)."""
    options = api_pb2.DevicePluginOptions(pre_start_required=True)
    plugin = serving(
        kubelet, plugins, {"a": HEALTHY}, options=options, host_paths={"a": "/dev/null"}
    )
    kubelet.admit("p1", "app", RESOURCE, 1)
    kubelet.restart()

    started = kubelet.start_container("p1", "app")
    assert [d.host_path for d in started.devices] == ["/dev/null"]
    assert started.pre_started == () and plugin.pre_start_requests == []
    assert kubelet.allocated(RESOURCE) == {"a"}
    kubelet.stop()  # a dead kubelet starts nothing
    with pytest.raises(KubeletError, match="not running"):
        kubelet.start_container("p1", "app")


def test_add_pod_holds_devices_without_allocate(
    kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = serving(kubelet, plugins, {"a": HEALTHY, "b": HEALTHY})
    uid = kubelet.add_pod("old", "ns", {"app": {RESOURCE: ["a"]}, "sidecar": {}})
    assert len(uid) == 36 and plugin.allocate_requests == []
    assert kubelet.allocated(RESOURCE) == {"a"}
    assert [d.container_path for d in kubelet.admit("new", "app", RESOURCE, 1).devices] == [
        "/dev/b"
    ]
    assert kubelet.start_container("old", "sidecar", namespace="ns").devices == ()
    with pytest.raises(KubeletError, match="exists"):
        kubelet.add_pod("old", "ns", {})
    with pytest.raises(ContainerStartError, match="endpoint not found in cache"):
        kubelet.add_pod("odd", "ns", {"app": {"example.com/never": ["x"]}})
        kubelet.start_container("odd", "app", namespace="ns")


# -- PodResources ----------------------------------------------------------------------------


@contextlib.contextmanager
def pod_resources(kubelet: FakeKubelet) -> Iterator[pr_grpc.PodResourcesListerStub]:
    assert kubelet.pod_resources_socket is not None
    # A channel of its own: gRPC's global subchannel pool would carry the reconnect backoff
    # of a refused connection into the next channel (UNAVAILABLE at once, seen under load).
    with grpc.insecure_channel(
        "unix:" + kubelet.pod_resources_socket, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        yield pr_grpc.PodResourcesListerStub(channel)


@pytest.fixture
def pr_kubelet(plugin_dir: str, hold_dir: str) -> Iterator[FakeKubelet]:
    socket_path = os.path.join(hold_dir, "pod-resources", "kubelet.sock")
    with FakeKubelet(plugin_dir, pod_resources_socket=socket_path) as k:
        yield k


def listed(response: pr_pb2.ListPodResourcesResponse) -> dict[str, Any]:
    """``{ns/name: {container: [(resource, [ids]), ...]}}``."""
    return {
        f"{p.namespace}/{p.name}": {
            c.name: [(d.resource_name, list(d.device_ids)) for d in c.devices] for c in p.containers
        }
        for p in response.pod_resources
    }


def pod_resources_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return details(info.value)


def test_pod_resources_list_allocatable_and_get(
    pr_kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    kubelet = pr_kubelet
    assert kubelet.pod_resources_socket is not None
    assert os.stat(os.path.dirname(kubelet.pod_resources_socket)).st_mode & 0o777 == (
        0o750 & ~_umask()
    )
    serving(kubelet, plugins, {"a": HEALTHY, "b": HEALTHY, "c": HEALTHY, "d": UNHEALTHY})
    kubelet.admit("p1", "app", RESOURCE, 2)
    kubelet.add_pod("p2", "ns2", {"vm": {RESOURCE: ["c"]}, "sidecar": {}})
    empty = pr_pb2.ListPodResourcesRequest()

    with pod_resources(kubelet) as lister:
        assert listed(lister.List(empty, timeout=WAIT)) == {
            "default/p1": {"app": [(RESOURCE, ["a"]), (RESOURCE, ["b"])]},  # one entry per ID
            "ns2/p2": {"vm": [(RESOURCE, ["c"])], "sidecar": []},
        }
        allocatable = lister.GetAllocatableResources(
            pr_pb2.AllocatableResourcesRequest(), timeout=WAIT
        )
        assert [(d.resource_name, list(d.device_ids)) for d in allocatable.devices] == [
            (RESOURCE, ["a"]),
            (RESOURCE, ["b"]),
            (RESOURCE, ["c"]),
        ]  # healthy ones, allocated or not
        got = lister.Get(pr_pb2.GetPodResourcesRequest(pod_name="p2", pod_namespace="ns2"))
        assert got.pod_resources.name == "p2" and len(got.pod_resources.containers) == 2
        missing = pr_pb2.GetPodResourcesRequest(pod_name="nobody", pod_namespace="default")
        assert pod_resources_error(lambda: lister.Get(missing, timeout=WAIT)) == (
            grpc.StatusCode.UNKNOWN,  # a Go error, not NOT_FOUND
            "pod nobody in namespace default not found",
        )

        kubelet.remove_pod("p1")
        kubelet.terminate_pod("p2", "ns2")
        assert listed(lister.List(empty, timeout=WAIT)) == {}  # active pods only
        finished = pr_pb2.GetPodResourcesRequest(pod_name="p2", pod_namespace="ns2")
        assert lister.Get(finished, timeout=WAIT).pod_resources.name == "p2"  # still known
    assert kubelet.allocated(RESOURCE) == set()
    assert [c.method for c in kubelet.pod_resources_calls] == [
        "List",
        "GetAllocatableResources",
        "Get",
        "Get",
        "List",
        "Get",
    ]


def test_pod_resources_allocatable_follows_health(
    pr_kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = serving(pr_kubelet, plugins, {"a": HEALTHY, "b": HEALTHY})
    request = pr_pb2.AllocatableResourcesRequest()
    with pod_resources(pr_kubelet) as lister:
        plugin.end_streams()  # disconnected: every device unhealthy
        assert pr_kubelet.wait_for(RESOURCE, lambda s: not s.connected, WAIT)
        assert list(lister.GetAllocatableResources(request, timeout=WAIT).devices) == []


def test_pod_resources_injected_failure(pr_kubelet: FakeKubelet) -> None:
    kubelet = pr_kubelet
    kubelet.add_pod("p1", "default", {"app": {}})
    empty = pr_pb2.ListPodResourcesRequest()
    get = pr_pb2.GetPodResourcesRequest(pod_name="p1", pod_namespace="default")
    with pod_resources(kubelet) as lister:
        kubelet.pod_resources_fail(grpc.StatusCode.UNAVAILABLE)
        assert pod_resources_error(lambda: lister.List(empty, timeout=WAIT)) == (
            grpc.StatusCode.UNAVAILABLE,
            "fake kubelet: UNAVAILABLE",
        )
        kubelet.pod_resources_fail(grpc.StatusCode.INTERNAL, "boom", methods={"Get"})
        assert len(lister.List(empty, timeout=WAIT).pod_resources) == 1
        assert pod_resources_error(lambda: lister.Get(get, timeout=WAIT)) == (
            grpc.StatusCode.INTERNAL,
            "boom",
        )
        kubelet.pod_resources_fail(None)
        assert lister.Get(get, timeout=WAIT).pod_resources.name == "p1"
    codes = [c.code for c in kubelet.pod_resources_calls]
    assert codes == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.OK,
    ]


@pytest.mark.parametrize("leave_socket", [False, True])
def test_pod_resources_stop_and_start_alone(
    pr_kubelet: FakeKubelet, plugins: Callable[..., TinyPlugin], leave_socket: bool
) -> None:
    kubelet = pr_kubelet
    path = kubelet.pod_resources_socket
    assert path is not None
    serving(kubelet, plugins, {"a": HEALTHY})
    empty = pr_pb2.ListPodResourcesRequest()

    kubelet.stop_pod_resources(leave_socket=leave_socket)
    assert not kubelet.pod_resources_running
    assert os.path.exists(path) is leave_socket
    with pod_resources(kubelet) as lister:
        code, _ = pod_resources_error(lambda: lister.List(empty, timeout=1.0))
        assert code == grpc.StatusCode.UNAVAILABLE
    assert kubelet.state(RESOURCE).connected  # the device plugin side is untouched

    kubelet.start_pod_resources()
    with pod_resources(kubelet) as lister:
        assert list(lister.List(empty, timeout=WAIT).pod_resources) == []
    kubelet.restart()  # a new kubelet instance serves PodResources again
    assert kubelet.pod_resources_running and os.path.exists(path)
    with pod_resources(kubelet) as lister:
        assert list(lister.List(empty, timeout=WAIT).pod_resources) == []


def test_pod_resources_rate_limit(plugin_dir: str, hold_dir: str) -> None:
    path = os.path.join(hold_dir, "pr.sock")
    empty = pr_pb2.ListPodResourcesRequest()
    limited = FakeKubelet(plugin_dir, pod_resources_socket=path, pod_resources_rate_limit=(1.0, 3))
    with limited, pod_resources(limited) as lister:
        for _ in range(3):  # the burst
            lister.List(empty, timeout=WAIT)
        assert pod_resources_error(lambda: lister.List(empty, timeout=WAIT)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            RATE_LIMITED,
        )
        time.sleep(1.1)  # one token back
        lister.List(empty, timeout=WAIT)
    unlimited = FakeKubelet(plugin_dir, pod_resources_socket=path)  # off by default
    with unlimited, pod_resources(unlimited) as lister:
        for _ in range(50):
            lister.List(empty, timeout=WAIT)


def test_pod_resources_get_behind_its_gate(plugin_dir: str, hold_dir: str) -> None:
    path = os.path.join(hold_dir, "pr.sock")
    with FakeKubelet(plugin_dir, pod_resources_socket=path, pod_resources_get=False) as k:
        k.add_pod("p1", "default", {})
        request = pr_pb2.GetPodResourcesRequest(pod_name="p1", pod_namespace="default")
        with pod_resources(k) as lister:
            assert pod_resources_error(lambda: lister.Get(request, timeout=WAIT)) == (
                grpc.StatusCode.UNKNOWN,
                "PodResources API Get method disabled",
            )


# -- kubelet 1.20 registration order ---------------------------------------------------------


@pytest.fixture
def legacy(plugin_dir: str) -> Iterator[FakeKubelet]:
    with FakeKubelet(plugin_dir, order="legacy", dial_timeout=1.0) as k:
        yield k


def test_legacy_order_answers_first_and_uses_the_request_options(
    legacy: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = plugins(
        devices={"a": HEALTHY},
        options=api_pb2.DevicePluginOptions(),  # would say: no PreStartContainer
        host_paths={"a": "/dev/null"},
    )
    register(legacy, "tiny.sock", options=api_pb2.DevicePluginOptions(pre_start_required=True))
    assert legacy.wait_for(RESOURCE, connected_with(1), WAIT)
    state = legacy.state(RESOURCE)
    assert state.options == api_pb2.DevicePluginOptions(pre_start_required=True)
    assert state.options_source == OPTIONS_FROM_REGISTER

    legacy.admit("p1", "app", RESOURCE, 1)
    legacy.start_container("p1", "app")
    legacy.restart_container("p1", "app")
    assert len(plugin.pre_start_requests) == 2  # the request's options rule
    assert plugin.options_calls == []  # GetDevicePluginOptions is never called


def test_legacy_register_without_options(
    legacy: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    plugin = plugins(
        devices={"a": HEALTHY},
        options=api_pb2.DevicePluginOptions(pre_start_required=True),
        host_paths={"a": "/dev/null"},
    )
    register(legacy, "tiny.sock")
    assert legacy.wait_for(RESOURCE, connected_with(1), WAIT)
    assert legacy.state(RESOURCE).options is None
    legacy.admit("p1", "app", RESOURCE, 1)
    legacy.start_container("p1", "app")
    assert plugin.pre_start_requests == [] and plugin.options_calls == []


def test_legacy_dial_failure_is_not_the_plugins_error(
    legacy: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    start = time.monotonic()
    register(legacy, "nobody.sock")  # answered OK before the dial
    assert time.monotonic() - start < 0.8  # the dial alone takes 1 s to give up
    [reg] = legacy.registrations
    assert reg.done and reg.error is None
    assert until(lambda: reg.connect_error is not None, WAIT)
    assert reg.connect_error == "failed to dial device plugin: context deadline exceeded"
    assert not legacy.state(RESOURCE).registered

    err = register_error(legacy, "tiny.sock", version="v1alpha1")  # the checks still answer
    assert "is not supported by kubelet" in str(details(err)[1])


def test_legacy_replaced_endpoint_still_feeds_snapshots(
    legacy: FakeKubelet, plugins: Callable[..., TinyPlugin]
) -> None:
    old = plugins("old.sock", devices={"a": HEALTHY})
    register(legacy, "old.sock")
    assert legacy.wait_for(RESOURCE, connected_with(1), WAIT)
    new = plugins("new.sock", devices={"x": HEALTHY, "y": HEALTHY})
    register(legacy, "new.sock")
    assert legacy.wait_for(RESOURCE, lambda s: s.endpoint == "new.sock" and s.capacity == 2, WAIT)

    time.sleep(0.1)
    assert old.streams_ended == 0  # 1.20 does not close the replaced endpoint
    old.push({"a": HEALTHY, "b": HEALTHY, "c": HEALTHY})  # keyed by resource name: it counts
    assert legacy.wait_for(RESOURCE, lambda s: s.capacity == 3, WAIT)
    old.end_streams()  # and its end no longer matters
    assert until(lambda: any(e.kind == "stream-ended" for e in legacy.events), WAIT)
    assert legacy.state(RESOURCE).connected
    legacy.allocate(RESOURCE, ["a"])
    assert len(new.allocate_requests) == 1 and old.allocate_requests == []


def test_bad_order_refused(plugin_dir: str) -> None:
    with pytest.raises(ValueError, match="order"):
        FakeKubelet(plugin_dir, order="1.20")  # type: ignore[arg-type]
