"""A stand-in for the kubelet's device manager, speaking to a device plugin through its sockets.

Written from the kubelet's behaviour (see reference/platform-facts.md, section A), not from
macvtapdp: only the generated Device Plugin API v1beta1 code is shared. What it mirrors:

- ``start()``: ``MkdirAll(dir, 0750)``, ``CleanupPluginDirectory`` (every unix socket goes,
  except ``kubelet_internal_checkpoint``), then serve ``v1beta1.Registration`` on
  ``kubelet.sock``. ``stop()`` drops the socket and every plugin connection, as a dying
  kubelet process does; ``restart()`` is a new kubelet instance.
- ``Register``: version and ``IsExtendedResourceName`` checks with the kubelet's messages, then,
  before answering, ``connectClient``: a blocking dial of ``<dir>/<endpoint>`` (10 s) and
  ``GetDevicePluginOptions``; their errors are the Register error. ``ListAndWatch`` then runs
  in the background (``go runClient``), never waited for.
- Every ``ListAndWatch`` response is a full snapshot (``genericDeviceUpdateCallback``); when the
  stream ends the endpoint is stopped and all its devices unhealthy (``PluginDisconnected``); the
  kubelet never dials again by itself.
- The newest registration of a resource wins; the replaced client is closed and its late stream
  end is ignored (clients keyed by resource *and* socket, kubernetes PR #135437).
- ``allocate``: one ``ContainerAllocateRequest`` per call, no deadline (``endpoint.allocate``).

Tests read per-resource ``ResourceState`` snapshots and block on ``wait_for``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("v1beta1",)  # KCONST SupportedVersions
KUBELET_SOCKET = "kubelet.sock"  # KCONST KubeletSocket
CHECKPOINT = "kubelet_internal_checkpoint"  # TYPES kubeletDeviceManagerCheckpoint
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
DIAL_TIMEOUT = 10.0  # CLI dial: context.WithTimeout(10 * time.Second)
PRE_START_TIMEOUT = 30.0  # KCONST KubeletPreStartContainerRPCTimeoutInSecs

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def is_qualified_name(value: str) -> bool:
    """apimachinery ``IsQualifiedName``: ``[subdomain/]name``, name <= 63, subdomain <= 253."""
    parts = value.split("/")
    if len(parts) > 2:
        return False
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
            return False
    name = parts[-1]
    return 0 < len(name) <= 63 and _QUALIFIED_NAME.fullmatch(name) is not None


def is_extended_resource_name(name: str) -> bool:
    """``v1helper.IsExtendedResourceName``, which the kubelet's Register applies."""
    if "/" not in name or "kubernetes.io/" in name:  # IsNativeResource
        return False
    if name.startswith("requests."):  # DefaultResourceRequestsPrefix
        return False
    return is_qualified_name("requests." + name)


def cleanup_plugin_directory(plugin_dir: str) -> None:
    """As ``CleanupPluginDirectory``: remove unix sockets only (stat follows symlinks).

    Directories, other files and ``kubelet_internal_checkpoint`` stay; errors are logged
    and skipped, as the kubelet does.
    """
    for name in os.listdir(plugin_dir):
        path = os.path.join(plugin_dir, name)
        if name == CHECKPOINT:
            continue
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.remove(path)
        except OSError as err:
            log.warning("fake kubelet: cannot clean %s: %s", path, err)


def _go_quote(value: str) -> str:
    """Go's ``%q`` for the strings tests use."""
    return json.dumps(value, ensure_ascii=False)


def _go_rpc_error(err: Exception) -> str:
    """A gRPC error as grpc-go prints it: ``rpc error: code = Unavailable desc = ...``."""
    if isinstance(err, grpc.Call):
        code = "".join(part.capitalize() for part in err.code().name.split("_"))
        return f"rpc error: code = {code} desc = {err.details()}"
    return str(err) or type(err).__name__


class KubeletError(Exception):
    """A refusal the kubelet itself makes (bad Register, stopped endpoint, empty answer)."""


@dataclass(frozen=True)
class ResourceState:
    """What the kubelet knows of one resource at one moment. Treat as read-only."""

    registered: bool = False  # a Register succeeded in this kubelet instance
    connected: bool = False  # that endpoint's ListAndWatch has not ended
    devices: dict[str, str] = field(default_factory=dict)  # latest snapshot: ID -> health
    endpoint: str | None = None  # socket file name of the current endpoint
    options: api_pb2.DevicePluginOptions | None = None  # GetDevicePluginOptions' answer
    register_count: int = 0  # successful registrations, over all kubelet instances
    stopped_at: float | None = None  # time.monotonic() of the disconnect

    @property
    def capacity(self) -> int:
        """``capacity = healthy + unhealthy`` (``GetCapacity``)."""
        return len(self.devices)

    @property
    def allocatable(self) -> int:
        """Devices whose health is exactly ``Healthy``."""
        return sum(1 for health in self.devices.values() if health == HEALTHY)


@dataclass
class Registration:
    """One Register request as received, and how it was answered (``error`` None: accepted)."""

    version: str
    endpoint: str
    resource_name: str
    options: api_pb2.DevicePluginOptions | None
    time: float  # time.monotonic() on arrival
    error: str | None = None
    done: bool = False


@dataclass(frozen=True)
class Event:
    """A line of the debugging log: ``kind`` is e.g. register, refused, connected, snapshot."""

    time: float
    kind: str
    resource: str
    detail: str


class _Client:
    """One dialled plugin endpoint: the kubelet's ``plugin/v1beta1.client``."""

    def __init__(self, resource: str, endpoint: str, path: str) -> None:
        self.resource = resource
        self.endpoint = endpoint
        self.path = path
        # A private subchannel pool: each dial is its own connection, as in grpc-go.
        self.channel = grpc.insecure_channel(
            "unix:" + path, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.stub = api_pb2_grpc.DevicePluginStub(self.channel)
        self._lock = threading.Lock()
        self._closed = False
        self._ready: grpc.Future[None] | None = None
        self._stream: grpc.Call | None = None

    def dial(self, timeout: float) -> None:
        """``grpc.DialContext(WithBlock)``: wait (retrying) until connected or timed out."""
        ready = grpc.channel_ready_future(self.channel)
        with self._lock:
            self._ready = ready
            closed = self._closed
        if closed:
            ready.cancel()
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise KubeletError("failed to dial device plugin: context deadline exceeded") from None
        except grpc.FutureCancelledError:
            raise KubeletError("failed to dial device plugin: context canceled") from None

    def watch(self) -> Iterator[api_pb2.ListAndWatchResponse]:
        """``ListAndWatch(context.TODO())``: no deadline; cancelled by ``close``."""
        stream = self.stub.ListAndWatch(api_pb2.Empty())
        with self._lock:
            self._stream = stream
            closed = self._closed
        if closed:
            stream.cancel()
        return stream

    def close(self) -> None:
        """``Disconnect``: close the connection, cancelling the dial and every call on it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ready, stream = self._ready, self._stream
        if ready is not None:
            ready.cancel()
        if stream is not None:
            stream.cancel()
        self.channel.close()


@dataclass
class _Resource:
    state: ResourceState = field(default_factory=ResourceState)
    client: _Client | None = None
    history: list[tuple[float, dict[str, str]]] = field(default_factory=list)


class _RegistrationServicer(api_pb2_grpc.RegistrationServicer):
    def __init__(self, kubelet: FakeKubelet, generation: int) -> None:
        self._kubelet = kubelet
        self._generation = generation

    def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        return self._kubelet._register(request, context, self._generation)


class FakeKubelet:
    """The kubelet's device manager, as far as a device plugin can see it."""

    def __init__(
        self, plugin_dir: str, *, dial_timeout: float = DIAL_TIMEOUT, workers: int = 32
    ) -> None:
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.socket_path = os.path.join(self.plugin_dir, KUBELET_SOCKET)
        self.dial_timeout = dial_timeout
        self.registrations: list[Registration] = []
        self.events: list[Event] = []
        self._workers = workers
        self._cond = threading.Condition()
        self._resources: dict[str, _Resource] = {}
        self._clients: set[_Client] = set()  # every client not yet closed
        self._followers: set[threading.Thread] = set()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._generation = 0  # one per kubelet instance

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        with self._cond:
            return self._server is not None

    def start(self) -> None:
        """As the device manager's ``server.Start``: mkdir, clean sockets, serve kubelet.sock."""
        with self._cond:
            if self._server is not None:
                raise RuntimeError("fake kubelet already started")
            generation = self._generation = self._generation + 1
        os.makedirs(self.plugin_dir, 0o750, exist_ok=True)
        cleanup_plugin_directory(self.plugin_dir)
        executor = ThreadPoolExecutor(self._workers, thread_name_prefix="fake-kubelet")
        server = grpc.server(executor)
        api_pb2_grpc.add_RegistrationServicer_to_server(
            _RegistrationServicer(self, generation), server
        )
        try:
            server.add_insecure_port("unix:" + self.socket_path)
            server.start()
        except BaseException:
            server.stop(None).wait()
            executor.shutdown(wait=True)
            raise
        with self._cond:
            self._server, self._executor = server, executor
            self._event("kubelet-start", "", self.socket_path)

    def stop(self) -> None:
        """End this kubelet instance: socket gone, every plugin connection and stream dropped.

        Its in-memory state dies with it: the next ``start()`` begins as ``readCheckpoint``
        does, every resource unregistered with capacity 0 until its plugin registers again.
        Registrations, events and histories are kept for the test.
        """
        with self._cond:
            server, executor = self._server, self._executor
            if server is None or executor is None:
                return
            self._server = self._executor = None
            self._generation += 1  # Registers still in flight can no longer commit
            clients = list(self._clients)
            for res in self._resources.values():
                res.client = None
                res.state = ResourceState(register_count=res.state.register_count)
            self._event("kubelet-stop", "", self.socket_path)
            self._cond.notify_all()
        for client in clients:
            self._drop(client)
        server.stop(None).wait()
        executor.shutdown(wait=True)  # every Register handler has returned: no new followers
        with self._cond:
            followers = list(self._followers)
        for thread in followers:
            thread.join(5.0)
            if thread.is_alive():
                log.error("fake kubelet: %s did not end", thread.name)

    def restart(self) -> None:
        """A new kubelet instance: plugin sockets deleted, a new kubelet.sock."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeKubelet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- observation -----------------------------------------------------------------------

    def state(self, resource: str) -> ResourceState:
        """The resource's current state (a default, unregistered one if never seen)."""
        with self._cond:
            return self._state(resource)

    def wait_for(
        self, resource: str, predicate: Callable[[ResourceState], bool], timeout: float
    ) -> bool:
        """Block until ``predicate(state)`` holds; False if it still does not after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._state(resource)), timeout)

    def history(self, resource: str) -> list[tuple[float, dict[str, str]]]:
        """Every ListAndWatch snapshot received for ``resource``: (time.monotonic(), ID->health)."""
        with self._cond:
            res = self._resources.get(resource)
            return [] if res is None else list(res.history)

    # -- calls the kubelet makes -----------------------------------------------------------

    def allocate(
        self, resource: str, device_ids: Sequence[str], timeout: float | None = None
    ) -> api_pb2.AllocateResponse:
        """As ``allocateContainerResources``: one container per call, no deadline by default.

        An answer without container responses is refused as the kubelet refuses it.
        """
        response = self.call_allocate(resource, [list(device_ids)], timeout)
        if not response.container_responses:
            raise KubeletError(f"no containers return in allocation response {response}")
        return response

    def call_allocate(
        self, resource: str, container_requests: Sequence[Sequence[str]], timeout: float | None
    ) -> api_pb2.AllocateResponse:
        """A raw Allocate with any number of containers (for tests of bad requests)."""
        request = api_pb2.AllocateRequest(
            container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=list(ids))
                for ids in container_requests
            ]
        )
        return self._client(resource).stub.Allocate(request, timeout=timeout)

    def get_options(
        self, resource: str, timeout: float | None = None
    ) -> api_pb2.DevicePluginOptions:
        """Ask the current endpoint ``GetDevicePluginOptions`` again."""
        return self._client(resource).stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=timeout)

    def pre_start(
        self, resource: str, device_ids: Sequence[str], timeout: float = PRE_START_TIMEOUT
    ) -> api_pb2.PreStartContainerResponse:
        """``PreStartContainer`` with the kubelet's 30 s deadline.

        The kubelet calls it only when the options say ``pre_start_required``; this does not check.
        """
        request = api_pb2.PreStartContainerRequest(devices_ids=list(device_ids))
        return self._client(resource).stub.PreStartContainer(request, timeout=timeout)

    # -- internals -------------------------------------------------------------------------

    def _state(self, resource: str) -> ResourceState:
        res = self._resources.get(resource)
        return ResourceState() if res is None else res.state

    def _event(self, kind: str, resource: str, detail: str) -> None:
        """Record a debugging event (caller holds the lock)."""
        self.events.append(Event(time.monotonic(), kind, resource, detail))
        log.debug("fake kubelet: %s %s %s", kind, resource, detail)

    def _client(self, resource: str) -> _Client:
        """The endpoint calls go to, refused as the kubelet refuses them."""
        with self._cond:
            res = self._resources.get(resource)
            if res is None or not res.state.registered:
                raise KubeletError(f"unknown Device Plugin {resource}")
            if res.client is None:
                raise KubeletError(f"endpoint {resource} has been stopped")
            return res.client

    def _drop(self, client: _Client) -> None:
        client.close()
        with self._cond:
            self._clients.discard(client)

    def _register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext, generation: int
    ) -> api_pb2.Empty:
        """``server.Register``: validate, then ``connectClient`` synchronously."""
        options = request.options if request.HasField("options") else None
        reg = Registration(
            request.version, request.endpoint, request.resource_name, options, time.monotonic()
        )
        with self._cond:
            self.registrations.append(reg)
            self._event("register", request.resource_name, f"endpoint={request.endpoint!r}")
        try:
            self._validate(request)
            self._connect(request, generation)
        except KubeletError as err:
            with self._cond:
                reg.error, reg.done = str(err), True
                self._event("refused", request.resource_name, str(err))
                self._cond.notify_all()
            # A Go error from a gRPC handler reaches the caller as code Unknown.
            context.abort(grpc.StatusCode.UNKNOWN, str(err))
        with self._cond:
            reg.done = True
        return api_pb2.Empty()

    def _validate(self, request: api_pb2.RegisterRequest) -> None:
        """The checks of ``server.Register``, with its messages (``errUnsupportedVersion``...)."""
        if request.version not in SUPPORTED_VERSIONS:
            supported = "[" + " ".join(_go_quote(v) for v in SUPPORTED_VERSIONS) + "]"
            raise KubeletError(
                f"requested API version {_go_quote(request.version)} is not supported by "
                f"kubelet. Supported version is {supported}"
            )
        if not is_extended_resource_name(request.resource_name):
            raise KubeletError(f"the ResourceName {_go_quote(request.resource_name)} is invalid")
        # Stricter than the kubelet, which dials filepath.Join(dir, endpoint) whatever it is.
        if request.endpoint in ("", ".", "..") or "/" in request.endpoint:
            raise KubeletError(
                f"fake kubelet: endpoint {_go_quote(request.endpoint)} is not a file name "
                "in the plugin directory"
            )

    def _connect(self, request: api_pb2.RegisterRequest, generation: int) -> None:
        """``connectClient``: dial (blocking, 10 s), ``PluginConnected``, then ``go runClient``."""
        path = os.path.join(self.plugin_dir, request.endpoint)
        client = _Client(request.resource_name, request.endpoint, path)
        with self._cond:
            if generation != self._generation:
                client.close()
                raise KubeletError("fake kubelet: this kubelet instance has stopped")
            self._clients.add(client)
        try:
            client.dial(self.dial_timeout)
            try:  # PluginConnected: GetDevicePluginOptions(context.Background()), no deadline
                options = client.stub.GetDevicePluginOptions(api_pb2.Empty())
            except Exception as err:
                raise KubeletError(
                    f"failed to get device plugin options: {_go_rpc_error(err)}"
                ) from None
            old, follower = self._connected(client, options, generation)
        except BaseException:
            self._drop(client)
            raise
        if old is not None:
            self._drop(old)
        follower.start()

    def _connected(
        self, client: _Client, options: api_pb2.DevicePluginOptions, generation: int
    ) -> tuple[_Client | None, threading.Thread]:
        """``PluginConnected``: the newest registration replaces the resource's endpoint.

        Devices stay as they were until the new endpoint's first snapshot.
        """
        with self._cond:
            if generation != self._generation:
                raise KubeletError("fake kubelet: this kubelet instance has stopped")
            res = self._resources.setdefault(client.resource, _Resource())
            old, res.client = res.client, client
            res.state = dataclasses.replace(
                res.state,
                registered=True,
                connected=True,
                endpoint=client.endpoint,
                options=options,
                register_count=res.state.register_count + 1,
                stopped_at=None,
            )
            follower = threading.Thread(
                target=self._follow,
                args=(client,),
                name=f"fake-kubelet-watch {client.resource} {client.endpoint}",
                daemon=True,
            )
            self._followers.add(follower)
            shown = str(options).replace("\n", " ").strip()
            detail = f"endpoint={client.endpoint!r} options={{{shown}}}"
            self._event("connected", client.resource, detail)
            if old is not None:
                self._event("superseded", client.resource, f"endpoint={old.endpoint!r}")
            self._cond.notify_all()
        return old, follower

    def _follow(self, client: _Client) -> None:
        """``client.Run``: receive snapshots until the stream ends, then disconnect."""
        reason = "plugin ended the stream"
        try:
            for response in client.watch():
                self._snapshot(client, response)
        except grpc.RpcError as err:
            reason = _go_rpc_error(err)
        except Exception as err:  # e.g. the channel closed under us by stop()
            reason = repr(err)
            log.debug("fake kubelet: ListAndWatch of %s failed", client.resource, exc_info=True)
        try:
            self._disconnected(client, reason)
        except Exception:
            log.exception("fake kubelet: disconnecting %s failed", client.resource)
        finally:
            with self._cond:
                self._followers.discard(threading.current_thread())

    def _snapshot(self, client: _Client, response: api_pb2.ListAndWatchResponse) -> None:
        """``genericDeviceUpdateCallback``: the response replaces the device list."""
        devices = {device.ID: device.health for device in response.devices}
        now = time.monotonic()
        with self._cond:
            res = self._resources.get(client.resource)
            if res is None or res.client is not client:
                self._event("ignored", client.resource, f"snapshot from {client.endpoint!r}")
                return
            res.state = dataclasses.replace(res.state, devices=devices)
            res.history.append((now, dict(devices)))
            healthy = res.state.allocatable
            self._event("snapshot", client.resource, f"{len(devices)} devices, {healthy} healthy")
            self._cond.notify_all()

    def _disconnected(self, client: _Client, reason: str) -> None:
        """``runClient`` after ``Run``: ``PluginDisconnected`` if still the current client.

        All devices turn unhealthy at once (allocatable 0, capacity kept) and the endpoint
        is stopped; a stream of a replaced client or of a stopped kubelet changes nothing.
        """
        with self._cond:
            res = self._resources.get(client.resource)
            if res is not None and res.client is client:
                res.client = None
                res.state = dataclasses.replace(
                    res.state,
                    connected=False,
                    devices=dict.fromkeys(res.state.devices, UNHEALTHY),
                    stopped_at=time.monotonic(),
                )
                self._event("disconnected", client.resource, reason)
            else:
                self._event("stream-ended", client.resource, f"{client.endpoint!r}: {reason}")
            self._cond.notify_all()
        self._drop(client)
