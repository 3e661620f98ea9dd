"""Self-tests of the kubelet stand-in (tests/kubelet.py) against a tiny in-test device plugin.

The plugin here is written with grpc directly, not with macvtapdp, so these tests check the
stand-in alone. No root, no network namespace.
"""

from __future__ import annotations

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

from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from tests.harness import until
from tests.kubelet import (
    CHECKPOINT,
    HEALTHY,
    KUBELET_SOCKET,
    UNHEALTHY,
    FakeKubelet,
    KubeletError,
    ResourceState,
    is_extended_resource_name,
)

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
    ) -> None:
        self.endpoint = endpoint
        self.path = os.path.join(plugin_dir, endpoint)
        self.options = options or api_pb2.DevicePluginOptions()
        self.options_delay = options_delay
        self.options_error = options_error
        self.options_calls: list[float] = []  # time.monotonic() of each GetDevicePluginOptions
        self.allocate_requests: list[api_pb2.AllocateRequest] = []
        self.pre_start_requests: list[api_pb2.PreStartContainerRequest] = []
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
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not offered")

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        self.allocate_requests.append(request)
        return api_pb2.AllocateResponse(
            container_responses=[
                api_pb2.ContainerAllocateResponse(
                    devices=[
                        api_pb2.DeviceSpec(
                            host_path=f"/dev/{i}", container_path=f"/dev/{i}", permissions="rw"
                        )
                        for i in c.devices_ids
                    ]
                )
                for c in request.container_requests
            ]
        )

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        self.pre_start_requests.append(request)
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


def test_no_threads_left_after_stop(plugin_dir: str, plugins: Callable[..., TinyPlugin]) -> None:
    baseline = set(threading.enumerate())
    kubelet = FakeKubelet(plugin_dir)
    for _ in range(3):
        kubelet.start()
        first = plugins("one.sock", devices={"a": HEALTHY})
        register(kubelet, "one.sock")
        second = plugins("two.sock", devices={"a": HEALTHY})
        register(kubelet, "two.sock")  # replaces the first
        assert kubelet.wait_for(RESOURCE, connected_with(1), WAIT)
        kubelet.allocate(RESOURCE, ["a"])
        kubelet.stop()
        first.close()
        second.close()
    assert not kubelet.running
    assert until(lambda: set(threading.enumerate()) <= baseline, WAIT), threading.enumerate()
