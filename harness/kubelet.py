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
- ``order="legacy"`` is kubelet 1.20 instead (``Register`` -> ``go m.addEndpoint(r)``): Register
  is answered at once after the two checks, the dial happens afterwards (its failure is only
  logged), the options are ``RegisterRequest.options`` and ``GetDevicePluginOptions`` is never
  called; a replaced endpoint is not closed, and its snapshots still update the resource
  (``callback`` is keyed by resource name), though its stream end no longer matters.

Pods and containers, as the device manager and the runtime see them:

- ``admit``: ``allocateContainerResources`` for one (container, resource): free devices stale
  pods hold first (``UpdateAllocatedDevices``), reuse the cached answer if the container already
  has its devices, else pick healthy unallocated devices (``GetPreferredAllocation`` first if the
  options offer it), one Allocate, and keep ``ContainerResponses[0]`` (the checkpoint's
  ``AllocResp``). A failed admission rejects the pod (not active any more).
- ``start_container``: ``GetDeviceRunContainerOptions`` at every start, restarts included:
  ``PreStartContainer`` (30 s) for each resource whose endpoint options say
  ``pre_start_required``, the cached responses merged (first device/mount per container path,
  first env/annotation per key), then containerd's ``WithDevices``: each ``host_path`` stat'ed
  (symlinks followed) at that moment; a missing path or one that is not a device node fails the
  start. Allocate is not called again.
- No Deallocate: a removed or finished pod's devices are freed by the next
  ``UpdateAllocatedDevices`` (at admission and at PodResources ``List``), silently.
- Pods and allocations outlive ``restart()`` (API server + checkpoint); endpoints do not.

PodResources v1 (``pod_resources_socket``), as ``server_v1.go``: ``List`` (active pods; one
``ContainerDevices`` per device ID), ``GetAllocatableResources`` (healthy devices of every
resource, allocated or not, one per ID), ``Get`` (any pod the kubelet still knows; a Go error,
so code UNKNOWN, when there is none). Optional rate limit as ``grpc/ratelimit.go``.

Tests read per-resource ``ResourceState`` snapshots and block on ``wait_for``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, TypeVar

import grpc

from macvtapdp.api.podresources.v1 import api_pb2 as pr_pb2
from macvtapdp.api.podresources.v1 import api_pb2_grpc as pr_grpc
from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("v1beta1",)  # KCONST SupportedVersions
KUBELET_SOCKET = "kubelet.sock"  # KCONST KubeletSocket
CHECKPOINT = "kubelet_internal_checkpoint"  # TYPES kubeletDeviceManagerCheckpoint
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
DIAL_TIMEOUT = 10.0  # CLI dial: context.WithTimeout(10 * time.Second)
PRE_START_TIMEOUT = 30.0  # KCONST KubeletPreStartContainerRPCTimeoutInSecs
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"  # PRS constants.go
POD_RESOURCES_QPS = 100.0  # PRS grpc/ratelimit.go DefaultQPS
POD_RESOURCES_BURST = 10  # PRS grpc/ratelimit.go DefaultBurstTokens
RATE_LIMITED = "rejected by rate limit"  # PRS grpc/ratelimit.go ErrorLimitExceeded
OPTIONS_FROM_PLUGIN = "GetDevicePluginOptions"  # order="sync": kubelet >= 1.25
OPTIONS_FROM_REGISTER = "RegisterRequest"  # order="legacy": kubelet 1.20

Order = Literal["sync", "legacy"]
_T = TypeVar("_T")

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


class AdmissionError(KubeletError):
    """The pod was rejected at admission (``UnexpectedAdmissionError``); it is not active."""


class ContainerStartError(KubeletError):
    """The container did not start (PreStartContainer failed, or the runtime refused a device)."""


@dataclass(frozen=True)
class ResourceState:
    """What the kubelet knows of one resource at one moment. Treat as read-only."""

    registered: bool = False  # a Register succeeded in this kubelet instance
    connected: bool = False  # that endpoint's ListAndWatch has not ended
    devices: dict[str, str] = field(default_factory=dict)  # latest snapshot: ID -> health
    # NUMA node IDs per device, for the Topology Manager; absent: the device has no topology
    topology: dict[str, tuple[int, ...]] = field(default_factory=dict)
    endpoint: str | None = None  # socket file name of the current endpoint
    # The options the endpoint is used with: GetDevicePluginOptions' answer (order="sync"), or
    # RegisterRequest.options (order="legacy"; None if the request had none).
    options: api_pb2.DevicePluginOptions | None = None
    options_source: str | None = None  # OPTIONS_FROM_PLUGIN or OPTIONS_FROM_REGISTER
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
    error: str | None = None  # the Register error the plugin got
    done: bool = False  # Register answered
    # order="legacy": the dial after the answer failed (the plugin never learns).
    connect_error: str | None = None


@dataclass(frozen=True)
class Event:
    """A line of the debugging log: ``kind`` is e.g. register, refused, connected, snapshot."""

    time: float
    kind: str
    resource: str
    detail: str


@dataclass(frozen=True)
class StartedDevice:
    """One device node as the runtime put it in a container's OCI spec (``linux.devices``)."""

    container_path: str
    host_path: str  # the DeviceSpec's, as given
    permissions: str  # the device cgroup rule's access, as given ("rw", "rwm", ...)
    type: str  # "c" or "b", from the node stat'ed at start
    major: int
    minor: int


@dataclass(frozen=True)
class ContainerStart:
    """One start of a container (first start or restart), and what it got."""

    pod: str
    namespace: str
    container: str
    attempt: int  # 0 for the first start, then one more per start attempt
    time: float  # time.monotonic()
    devices: tuple[StartedDevice, ...] = ()
    envs: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[api_pb2.Mount, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    pre_started: tuple[str, ...] = ()  # resources PreStartContainer was called for, in order
    error: str | None = None  # None: started


@dataclass(frozen=True)
class PodResourcesCall:
    """One call the PodResources server received: method name and the status it answered."""

    time: float
    method: str  # "List", "GetAllocatableResources" or "Get"
    code: grpc.StatusCode


@dataclass
class _Pod:
    """A pod the kubelet knows (its pod manager), by UID."""

    uid: str
    name: str
    namespace: str
    containers: list[str] = field(default_factory=list)  # spec order
    active: bool = True  # GetActivePods: not Succeeded/Failed/rejected
    starts: dict[str, int] = field(default_factory=dict)  # container -> start attempts


@dataclass
class _Assignment:
    """A ``podDevices`` entry: one (pod, container, resource), as the checkpoint keeps it."""

    device_ids: list[str]
    response: api_pb2.ContainerAllocateResponse


class _TokenBucket:
    """``golang.org/x/time/rate.Limiter``'s ``Allow``: ``burst`` tokens, refilled at ``qps``."""

    def __init__(self, qps: float, burst: int) -> None:
        self._qps, self._burst = qps, burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self._burst), self._tokens + (now - self._last) * self._qps)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class _PodResourcesServicer(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self._kubelet = kubelet

    def List(
        self, request: pr_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.ListPodResourcesResponse:
        return self._kubelet._pod_resources_call("List", context, self._kubelet._list_pods)

    def GetAllocatableResources(
        self, request: pr_pb2.AllocatableResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.AllocatableResourcesResponse:
        kubelet = self._kubelet
        return kubelet._pod_resources_call(
            "GetAllocatableResources", context, kubelet._allocatable_resources
        )

    def Get(
        self, request: pr_pb2.GetPodResourcesRequest, context: grpc.ServicerContext
    ) -> pr_pb2.GetPodResourcesResponse:
        kubelet = self._kubelet
        return kubelet._pod_resources_call(
            "Get", context, lambda: kubelet._get_pod(request.pod_name, request.pod_namespace)
        )


class _Abort(Exception):
    """A PodResources handler's Go error: answered with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _run_container_options(
    responses: Sequence[api_pb2.ContainerAllocateResponse],
) -> tuple[dict[str, str], tuple[api_pb2.Mount, ...], dict[str, str], list[api_pb2.DeviceSpec]]:
    """``deviceRunContainerOptions``: the cached responses of a container's resources merged;
    the first device and mount per container path and the first env and annotation per key
    win (the kubelet logs the conflicts and goes on)."""
    envs: dict[str, str] = {}
    annotations: dict[str, str] = {}
    mounts: dict[str, api_pb2.Mount] = {}
    devices: dict[str, api_pb2.DeviceSpec] = {}
    for response in responses:
        for key, value in response.envs.items():
            envs.setdefault(key, value)
        for spec in response.devices:
            devices.setdefault(spec.container_path, spec)
        for mount in response.mounts:
            mounts.setdefault(mount.container_path, mount)
        for key, value in response.annotations.items():
            annotations.setdefault(key, value)
    return envs, tuple(mounts.values()), annotations, list(devices.values())


def _device_from_spec(spec: api_pb2.DeviceSpec) -> StartedDevice:
    """containerd's ``WithDevices`` for one DeviceSpec: ``os.Stat`` the host path, follow
    symlinks, take type and (major, minor) from the node as it is now.

    Stricter than containerd for two kinds of path no device plugin means in a DeviceSpec: a
    directory (containerd would add every device node under it) and a FIFO (containerd would
    add it as type "p") are refused here.
    """
    path, target = spec.host_path, spec.container_path
    try:
        info = os.stat(path)
    except OSError as err:
        reason = os.strerror(err.errno).lower() if err.errno else str(err)
        raise ContainerStartError(f"error stating device path: stat {path}: {reason}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ContainerStartError(
            f"fake kubelet: device path {_go_quote(path)} is a directory "
            "(containerd would pass every device node under it)"
        )
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise ContainerStartError(
            f"get device path: {_go_quote(path)} containerPath: {_go_quote(target)} "
            "error: not a device node"
        )
    return StartedDevice(
        container_path=target,
        host_path=path,
        permissions=spec.permissions,
        type=kind,
        major=os.major(info.st_rdev),
        minor=os.minor(info.st_rdev),
    )


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
    # order="legacy": replaced endpoints, never closed by the kubelet, still feeding snapshots.
    superseded: list[_Client] = field(default_factory=list)


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
        self,
        plugin_dir: str,
        *,
        dial_timeout: float = DIAL_TIMEOUT,
        workers: int = 32,
        order: Order = "sync",
        pod_resources_socket: str | None = None,
        pod_resources_rate_limit: tuple[float, int] | None = None,
        pod_resources_get: bool = True,
    ) -> None:
        """``order``: "sync" (kubelet >= 1.25) or "legacy" (1.20), see the module docstring.

        ``pod_resources_socket``: serve PodResources v1 there too (the real one is
        ``POD_RESOURCES_SOCKET``); ``pod_resources_rate_limit``: (qps, burst), e.g.
        ``(POD_RESOURCES_QPS, POD_RESOURCES_BURST)`` as the kubelet; off by default.
        ``pod_resources_get=False`` is a kubelet without the ``KubeletPodResourcesGet`` gate
        (alpha and off before 1.34).
        """
        if order not in ("sync", "legacy"):
            raise ValueError(f"order must be 'sync' or 'legacy', not {order!r}")
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.socket_path = os.path.join(self.plugin_dir, KUBELET_SOCKET)
        self.dial_timeout = dial_timeout
        self.order: Order = order
        self.pod_resources_socket = (
            None if pod_resources_socket is None else os.path.abspath(pod_resources_socket)
        )
        self.pod_resources_get = pod_resources_get
        self.registrations: list[Registration] = []
        self.events: list[Event] = []
        self.starts: list[ContainerStart] = []  # every container start attempt
        self.pod_resources_calls: list[PodResourcesCall] = []
        self._workers = workers
        self._cond = threading.Condition()
        self._resources: dict[str, _Resource] = {}
        self._clients: set[_Client] = set()  # every client not yet closed
        self._followers: set[threading.Thread] = set()
        self._connectors: set[threading.Thread] = set()  # order="legacy": dials after Register
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._generation = 0  # one per kubelet instance
        # The pod manager and the device manager's podDevices (kept across restarts, as the
        # API server and the checkpoint keep them), plus devices picked for an Allocate in flight.
        self._pods: dict[str, _Pod] = {}  # by UID, in the order pods came
        self._pod_devices: dict[str, dict[str, dict[str, _Assignment]]] = {}  # uid/container/res
        self._reserved: dict[str, set[str]] = {}
        self._limiter = (
            None if pod_resources_rate_limit is None else _TokenBucket(*pod_resources_rate_limit)
        )
        self._pr_failure: tuple[grpc.StatusCode, str, frozenset[str] | None] | None = None
        self._pr_server: grpc.Server | None = None
        self._pr_executor: ThreadPoolExecutor | None = None

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
        if self.pod_resources_socket is not None:
            self.start_pod_resources()

    def stop(self) -> None:
        """End this kubelet instance: socket gone, every plugin connection and stream dropped.

        Its in-memory state dies with it: the next ``start()`` begins as ``readCheckpoint``
        does, every resource unregistered with capacity 0 until its plugin registers again.
        Pods and their devices are kept (API server and checkpoint), as are registrations,
        events, starts and histories. The PodResources server stops too.
        """
        with self._cond:
            server, executor = self._server, self._executor
            if server is None or executor is None:
                clients = []
            else:
                self._server = self._executor = None
                self._generation += 1  # Registers still in flight can no longer commit
                clients = list(self._clients)
                for res in self._resources.values():
                    res.client = None
                    res.superseded = []
                    res.state = ResourceState(register_count=res.state.register_count)
                self._event("kubelet-stop", "", self.socket_path)
                self._cond.notify_all()
        self.stop_pod_resources()
        if server is None or executor is None:
            return
        for client in clients:
            self._drop(client)
        server.stop(None).wait()
        executor.shutdown(wait=True)  # every Register handler has returned
        with self._cond:
            connectors = list(self._connectors)
        for thread in connectors:  # legacy dials: cancelled above, and can commit no more
            thread.join(5.0)
            if thread.is_alive():
                log.error("fake kubelet: %s did not end", thread.name)
        with self._cond:
            followers = list(self._followers)  # complete now: nothing can start another
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

    # -- pods and containers ---------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        namespace: str,
        containers: Mapping[str, Mapping[str, Sequence[str]]],
    ) -> str:
        """A pod the kubelet already holds devices for, without asking the plugin.

        ``containers``: container name -> resource -> device IDs (``{}`` for none), as a
        checkpoint restored after a kubelet restart would have it (each entry's cached
        AllocateResponse is empty). The devices count as allocated. Returns the pod's UID.
        """
        with self._cond:
            pod = self._new_pod(name, namespace)
            for container, resources in containers.items():
                pod.containers.append(container)
                for resource, ids in resources.items():
                    self._pod_devices.setdefault(pod.uid, {}).setdefault(container, {})[
                        resource
                    ] = _Assignment(list(ids), api_pb2.ContainerAllocateResponse())
            self._event("pod-added", "", f"{namespace}/{name} uid={pod.uid}")
            self._cond.notify_all()
            return pod.uid

    def remove_pod(self, name: str, namespace: str = "default") -> None:
        """The pod is deleted and gone. Its devices are freed without a word to the plugin
        (there is no Deallocate), by the next ``UpdateAllocatedDevices``."""
        with self._cond:
            pod = self._find_pod(name, namespace)
            del self._pods[pod.uid]
            self._event("pod-removed", "", f"{namespace}/{name} uid={pod.uid}")
            self._cond.notify_all()

    def terminate_pod(self, name: str, namespace: str = "default") -> None:
        """The pod finished (Succeeded/Failed) but is not deleted yet: no longer active (not in
        ``List``, its devices freed as for a removed pod), still known (``Get`` finds it)."""
        with self._cond:
            pod = self._find_pod(name, namespace)
            pod.active = False
            self._event("pod-terminated", "", f"{namespace}/{name} uid={pod.uid}")
            self._cond.notify_all()

    def admit(
        self,
        pod: str,
        container: str,
        resource: str,
        devices: int | Sequence[str],
        *,
        namespace: str = "default",
        timeout: float | None = None,
    ) -> api_pb2.ContainerAllocateResponse:
        """Admit ``container`` of ``pod`` (made if new) with ``devices`` of ``resource``.

        ``devices``: how many (the kubelet picks, as ``devicesToAllocate``), or exactly which
        IDs (each must be healthy and unallocated). If the container already holds devices of
        the resource, their cached response is returned and the plugin is not called. Otherwise
        one Allocate (no deadline unless ``timeout``), whose ``ContainerResponses[0]`` is kept
        and returned. Any failure raises ``AdmissionError`` and rejects the pod.
        """
        if isinstance(devices, int) and devices < 1:
            raise ValueError("admit at least one device")
        with self._cond:
            if self._server is None:
                raise KubeletError("fake kubelet: not running")
            entry = self._lookup_pod(pod, namespace)
            if entry is None:
                entry = self._new_pod(pod, namespace)
            elif not entry.active:
                raise AdmissionError(f"fake kubelet: pod {namespace}/{pod} is not active")
            if container not in entry.containers:
                entry.containers.append(container)
            uid = entry.uid
        try:
            return self._allocate_container(uid, container, resource, devices, timeout)
        except KubeletError as err:
            with self._cond:
                if uid in self._pods:
                    self._pods[uid].active = False  # a rejected pod goes Failed
                self._event("rejected", resource, f"{namespace}/{pod}/{container}: {err}")
                self._cond.notify_all()
            if isinstance(err, AdmissionError):
                raise
            raise AdmissionError(str(err)) from err

    def start_container(
        self, pod: str, container: str, *, namespace: str = "default"
    ) -> ContainerStart:
        """Start (or restart) a container, as the kubelet and containerd do at every start.

        For each resource the container holds: ``PreStartContainer`` (30 s deadline) if that
        endpoint's options say ``pre_start_required``. Then the cached Allocate responses,
        merged, and each DeviceSpec's ``host_path`` stat'ed now: what the container gets, with
        the (major, minor) of this moment. Allocate is not called. Raises
        ``ContainerStartError`` when the start fails; every attempt is in ``starts``.
        """
        with self._cond:
            if self._server is None:
                raise KubeletError("fake kubelet: not running")
            entry = self._find_pod(pod, namespace)
            if not entry.active:
                raise ContainerStartError(f"fake kubelet: pod {namespace}/{pod} is not active")
            if container not in entry.containers:
                raise ContainerStartError(
                    f"fake kubelet: pod {namespace}/{pod} has no container {container!r}"
                )
            attempt = entry.starts.get(container, 0)
            entry.starts[container] = attempt + 1
            uid = entry.uid
            assignments = dict(self._pod_devices.get(uid, {}).get(container, {}))
        begun = time.monotonic()
        pre_started: list[str] = []
        try:
            for resource, assignment in assignments.items():
                if self._pre_start_if_needed(resource, assignment.device_ids):
                    pre_started.append(resource)
            envs, mounts, annotations, specs = _run_container_options(
                [a.response for a in assignments.values()]
            )
            started = tuple(_device_from_spec(spec) for spec in specs)
        except KubeletError as err:
            failed = ContainerStart(
                pod,
                namespace,
                container,
                attempt,
                begun,
                pre_started=tuple(pre_started),
                error=str(err),
            )
            with self._cond:
                self.starts.append(failed)
                self._event("start-failed", "", f"{namespace}/{pod}/{container}: {err}")
                self._cond.notify_all()
            if isinstance(err, ContainerStartError):
                raise
            raise ContainerStartError(str(err)) from err
        result = ContainerStart(
            pod,
            namespace,
            container,
            attempt,
            begun,
            devices=started,
            envs=envs,
            mounts=mounts,
            annotations=annotations,
            pre_started=tuple(pre_started),
        )
        with self._cond:
            self.starts.append(result)
            shown = ", ".join(f"{d.container_path}={d.major}:{d.minor}" for d in started)
            self._event("started", "", f"{namespace}/{pod}/{container} #{attempt}: {shown}")
            self._cond.notify_all()
        return result

    def restart_container(
        self, pod: str, container: str, *, namespace: str = "default"
    ) -> ContainerStart:
        """A container restart: just another start (no Allocate; PreStartContainer again)."""
        return self.start_container(pod, container, namespace=namespace)

    def allocated(self, resource: str) -> frozenset[str]:
        """The device IDs of ``resource`` the device manager holds for active pods."""
        with self._cond:
            self._update_allocated_devices()
            return frozenset(self._allocated(resource))

    def allocation(
        self, pod: str, container: str, resource: str, *, namespace: str = "default"
    ) -> tuple[list[str], api_pb2.ContainerAllocateResponse] | None:
        """The cached (device IDs, ContainerAllocateResponse) of one container and resource."""
        with self._cond:
            entry = self._find_pod(pod, namespace)
            found = self._pod_devices.get(entry.uid, {}).get(container, {}).get(resource)
            return None if found is None else (list(found.device_ids), found.response)

    # -- PodResources ----------------------------------------------------------------------

    @property
    def pod_resources_running(self) -> bool:
        with self._cond:
            return self._pr_server is not None

    def start_pod_resources(self) -> None:
        """Serve PodResources v1 on ``pod_resources_socket`` (a new socket file)."""
        path = self.pod_resources_socket
        if path is None:
            raise RuntimeError("fake kubelet: no pod_resources_socket configured")
        with self._cond:
            if self._pr_server is not None:
                raise RuntimeError("fake kubelet: PodResources already served")
        os.makedirs(os.path.dirname(path), 0o750, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # util.CreateListener: unlink a previous socket file
        executor = ThreadPoolExecutor(8, thread_name_prefix="fake-kubelet-podresources")
        server = grpc.server(executor)
        pr_grpc.add_PodResourcesListerServicer_to_server(_PodResourcesServicer(self), server)
        try:
            server.add_insecure_port("unix:" + path)
            server.start()
        except BaseException:
            server.stop(None).wait()
            executor.shutdown(wait=True)
            raise
        with self._cond:
            self._pr_server, self._pr_executor = server, executor
            self._event("podresources-start", "", path)

    def stop_pod_resources(self, *, leave_socket: bool = False) -> None:
        """Stop serving PodResources (the device plugin side is untouched).

        ``leave_socket``: leave a dead socket file behind, as a killed kubelet does, so that
        clients get "connection refused" rather than "no such file".
        """
        with self._cond:
            server, executor = self._pr_server, self._pr_executor
            self._pr_server = self._pr_executor = None
        if server is None or executor is None:
            return
        server.stop(None).wait()
        executor.shutdown(wait=True)
        path = self.pod_resources_socket
        assert path is not None
        if leave_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
                dead.bind(path)  # bound, never listening, closed: ECONNREFUSED
        with self._cond:
            self._event("podresources-stop", "", path)

    def pod_resources_fail(
        self,
        code: grpc.StatusCode | None,
        details: str | None = None,
        *,
        methods: Collection[str] | None = None,
    ) -> None:
        """Make PodResources answer ``code`` (to every method, or to ``methods`` only);
        ``None`` answers normally again. The rate limit, if any, still applies first."""
        with self._cond:
            if code is None:
                self._pr_failure = None
            else:
                shown = details if details is not None else f"fake kubelet: {code.name}"
                self._pr_failure = (code, shown, None if methods is None else frozenset(methods))

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

    def _new_pod(self, name: str, namespace: str) -> _Pod:
        """A new pod with a fresh UID (caller holds the lock)."""
        if self._lookup_pod(name, namespace) is not None:
            raise KubeletError(f"fake kubelet: pod {namespace}/{name} exists")
        pod = _Pod(str(uuid.uuid4()), name, namespace)
        self._pods[pod.uid] = pod
        return pod

    def _lookup_pod(self, name: str, namespace: str) -> _Pod | None:
        """``GetPodByName``: any pod the kubelet knows, active or not (caller holds the lock)."""
        for pod in self._pods.values():
            if (pod.name, pod.namespace) == (name, namespace):
                return pod
        return None

    def _find_pod(self, name: str, namespace: str) -> _Pod:
        pod = self._lookup_pod(name, namespace)
        if pod is None:
            raise KubeletError(f"fake kubelet: no pod {namespace}/{name}")
        return pod

    def _update_allocated_devices(self) -> None:
        """``UpdateAllocatedDevices``: forget the devices of every pod that is not active."""
        active = {uid for uid, pod in self._pods.items() if pod.active}
        for uid in [uid for uid in self._pod_devices if uid not in active]:
            gone = self._pod_devices.pop(uid)
            freed = sorted({i for c in gone.values() for a in c.values() for i in a.device_ids})
            self._event("freed", "", f"pod uid={uid}: {', '.join(freed) or 'no devices'}")

    def _allocated(self, resource: str) -> set[str]:
        """``allocatedDevices[resource]``: podDevices plus picks in flight (lock held)."""
        held = set(self._reserved.get(resource, ()))
        for containers in self._pod_devices.values():
            for resources in containers.values():
                if resource in resources:
                    held.update(resources[resource].device_ids)
        return held

    def _allocate_container(
        self,
        uid: str,
        container: str,
        resource: str,
        devices: int | Sequence[str],
        timeout: float | None,
    ) -> api_pb2.ContainerAllocateResponse:
        """``allocateContainerResources`` for one resource: ``devicesToAllocate``, Allocate."""
        with self._cond:
            self._update_allocated_devices()
            held = self._pod_devices.get(uid, {}).get(container, {}).get(resource)
            needed = devices if isinstance(devices, int) else len(devices)
            if held is not None:  # "This can happen if a container restarts for example."
                if len(held.device_ids) != needed:
                    raise AdmissionError(
                        f"pod {_go_quote(uid)} container {_go_quote(container)} changed request "
                        f"for resource {_go_quote(resource)} from {len(held.device_ids)} to "
                        f"{needed}"
                    )
                return held.response
            res = self._resources.get(resource)
            if res is None:
                raise AdmissionError(f"cannot allocate unregistered device {resource}")
            in_use = self._allocated(resource)
            available = [
                i
                for i, health in res.state.devices.items()
                if health == HEALTHY and i not in in_use
            ]
            if isinstance(devices, int):
                if len(available) < needed:
                    raise AdmissionError(
                        f"requested number of devices unavailable for {resource}. "
                        f"Requested: {needed}, Available: {len(available)}"
                    )
                options = res.state.options
                ask = options is not None and options.get_preferred_allocation_available
            else:
                wrong = [i for i in devices if i not in available]
                if wrong or len(set(devices)) != len(devices):
                    raise AdmissionError(
                        f"fake kubelet: {', '.join(wrong) or 'duplicate IDs'} of {resource} "
                        "not healthy and free"
                    )
                ask = False
            picked = list(devices) if not isinstance(devices, int) else available[:needed]
            self._reserved.setdefault(resource, set()).update(available if ask else picked)
        try:
            if ask:
                assert isinstance(devices, int)
                picked = self._preferred(resource, available, needed)
                with self._cond:
                    self._reserved[resource].difference_update(set(available) - set(picked))
            try:
                response = self.call_allocate(resource, [picked], timeout)
            except KubeletError:
                raise
            except grpc.RpcError as err:
                raise AdmissionError(
                    f"Allocate failed due to {_go_rpc_error(err)}, which is unexpected"
                ) from err
            if not response.container_responses:
                raise AdmissionError(f"no containers return in allocation response {response}")
            with self._cond:
                if uid in self._pods:
                    self._pod_devices.setdefault(uid, {}).setdefault(container, {})[resource] = (
                        _Assignment(picked, response.container_responses[0])
                    )
                self._event("allocated", resource, f"uid={uid}/{container}: {', '.join(picked)}")
                self._cond.notify_all()
            return response.container_responses[0]
        finally:
            with self._cond:
                self._reserved[resource].difference_update(available if ask else picked)

    def _preferred(self, resource: str, available: list[str], needed: int) -> list[str]:
        """``callGetPreferredAllocationIfAvailable``, then what is left, in snapshot order."""
        request = api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=[], allocation_size=needed
                )
            ]
        )
        try:
            answer = self._client(resource).stub.GetPreferredAllocation(request)
        except grpc.RpcError as err:
            raise AdmissionError(
                f"device plugin GetPreferredAllocation rpc failed with err: {_go_rpc_error(err)}"
            ) from err
        preferred = [
            i
            for r in answer.container_responses[:1]
            for i in r.deviceIDs
            if i in available  # preferred.Intersection(available)
        ]
        picked = list(dict.fromkeys(preferred))[:needed]
        picked += [i for i in available if i not in picked][: needed - len(picked)]
        return picked

    def _pre_start_if_needed(self, resource: str, device_ids: Sequence[str]) -> bool:
        """``callPreStartContainerIfNeeded``; True if PreStartContainer was called."""
        with self._cond:
            res = self._resources.get(resource)
            if res is None:
                raise ContainerStartError(
                    f"endpoint not found in cache for a registered resource: {resource}"
                )
            options, client = res.state.options, res.client
        if options is None or not options.pre_start_required:
            return False
        if client is None:
            raise ContainerStartError(
                "device plugin PreStartContainer rpc failed with err: "
                f"endpoint {resource} has been stopped"
            )
        request = api_pb2.PreStartContainerRequest(devices_ids=list(device_ids))
        try:
            client.stub.PreStartContainer(request, timeout=PRE_START_TIMEOUT)
        except grpc.RpcError as err:
            raise ContainerStartError(
                f"device plugin PreStartContainer rpc failed with err: {_go_rpc_error(err)}"
            ) from err
        return True

    def _pod_resources_call(
        self, method: str, context: grpc.ServicerContext, answer: Callable[[], _T]
    ) -> _T:
        """One unary PodResources call: rate limit (interceptor), injected failure, answer."""
        code, details = grpc.StatusCode.OK, ""
        result: _T | None = None
        if self._limiter is not None and not self._limiter.allow():
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED
        else:
            with self._cond:
                failure = self._pr_failure
            if failure is not None and (failure[2] is None or method in failure[2]):
                code, details = failure[0], failure[1]
            else:
                try:
                    result = answer()
                except _Abort as err:
                    code, details = err.code, err.details
        with self._cond:
            self.pod_resources_calls.append(PodResourcesCall(time.monotonic(), method, code))
            self._cond.notify_all()
        if result is None:
            context.abort(code, details)
        assert result is not None
        return result

    def _container_resources(self, pod: _Pod) -> list[pr_pb2.ContainerResources]:
        """``getContainerResources`` of each container: one ContainerDevices per device ID
        (``containerDevicesFromResourceDeviceInstances``; no topology reported)."""
        held = self._pod_devices.get(pod.uid, {})
        return [
            pr_pb2.ContainerResources(
                name=container,
                devices=[
                    pr_pb2.ContainerDevices(resource_name=resource, device_ids=[device])
                    for resource, assignment in held.get(container, {}).items()
                    for device in assignment.device_ids
                ],
            )
            for container in pod.containers
        ]

    def _list_pods(self) -> pr_pb2.ListPodResourcesResponse:
        """``List``: ``UpdateAllocatedDevices``, then every active pod."""
        with self._cond:
            self._update_allocated_devices()
            return pr_pb2.ListPodResourcesResponse(
                pod_resources=[
                    pr_pb2.PodResources(
                        name=pod.name,
                        namespace=pod.namespace,
                        containers=self._container_resources(pod),
                    )
                    for pod in self._pods.values()
                    if pod.active
                ]
            )

    def _allocatable_resources(self) -> pr_pb2.AllocatableResourcesResponse:
        """``GetAllocatableResources``: ``allDevices.Filter(healthyDevices)``, allocated or not."""
        with self._cond:
            return pr_pb2.AllocatableResourcesResponse(
                devices=[
                    pr_pb2.ContainerDevices(resource_name=resource, device_ids=[device])
                    for resource, res in self._resources.items()
                    for device, health in res.state.devices.items()
                    if health == HEALTHY
                ]
            )

    def _get_pod(self, name: str, namespace: str) -> pr_pb2.GetPodResourcesResponse:
        """``Get``: any pod still known (``GetPodByName``), without ``UpdateAllocatedDevices``.

        Its errors are Go errors (``fmt.Errorf``), so grpc-go answers them with code Unknown.
        """
        if not self.pod_resources_get:
            raise _Abort(grpc.StatusCode.UNKNOWN, "PodResources API Get method disabled")
        with self._cond:
            pod = self._lookup_pod(name, namespace)
            if pod is None:
                raise _Abort(
                    grpc.StatusCode.UNKNOWN, f"pod {name} in namespace {namespace} not found"
                )
            return pr_pb2.GetPodResourcesResponse(
                pod_resources=pr_pb2.PodResources(
                    name=pod.name,
                    namespace=pod.namespace,
                    containers=self._container_resources(pod),
                )
            )

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
            if self.order == "legacy":
                self._connect_later(request, generation, reg)
            else:
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
        """``connectClient``: dial (blocking, 10 s), ``PluginConnected``, then ``go runClient``.

        With order="legacy", ``addEndpoint``: the same dial, no ``GetDevicePluginOptions``, the
        request's options, and the replaced endpoint left open.
        """
        path = os.path.join(self.plugin_dir, request.endpoint)
        client = _Client(request.resource_name, request.endpoint, path)
        with self._cond:
            if generation != self._generation:
                client.close()
                raise KubeletError("fake kubelet: this kubelet instance has stopped")
            self._clients.add(client)
        try:
            client.dial(self.dial_timeout)
            options: api_pb2.DevicePluginOptions | None
            if self.order == "legacy":  # registerEndpoint(r.ResourceName, r.Options, new)
                options = request.options if request.HasField("options") else None
                source = OPTIONS_FROM_REGISTER
            else:  # PluginConnected: GetDevicePluginOptions(context.Background()), no deadline
                try:
                    options = client.stub.GetDevicePluginOptions(api_pb2.Empty())
                except Exception as err:
                    raise KubeletError(
                        f"failed to get device plugin options: {_go_rpc_error(err)}"
                    ) from None
                source = OPTIONS_FROM_PLUGIN
            old, follower = self._connected(client, options, source, generation)
        except BaseException:
            self._drop(client)
            raise
        if old is not None and self.order != "legacy":
            self._drop(old)
        follower.start()

    def _connect_later(
        self, request: api_pb2.RegisterRequest, generation: int, reg: Registration
    ) -> None:
        """Kubelet 1.20's ``go m.addEndpoint(r)``: Register is answered before the dial."""

        def run() -> None:
            try:
                self._connect(request, generation)
            except Exception as err:  # "Failed to dial device plugin with request": logged only
                with self._cond:
                    reg.connect_error = str(err)
                    self._event("dial-failed", request.resource_name, str(err))
                    self._cond.notify_all()
            finally:
                with self._cond:
                    self._connectors.discard(threading.current_thread())

        thread = threading.Thread(
            target=run, name=f"fake-kubelet-addEndpoint {request.resource_name}", daemon=True
        )
        with self._cond:
            if generation != self._generation:
                raise KubeletError("fake kubelet: this kubelet instance has stopped")
            self._connectors.add(thread)
        thread.start()

    def _connected(
        self,
        client: _Client,
        options: api_pb2.DevicePluginOptions | None,
        source: str,
        generation: int,
    ) -> tuple[_Client | None, threading.Thread]:
        """``PluginConnected``: the newest registration replaces the resource's endpoint.

        Devices stay as they were until the new endpoint's first snapshot.
        """
        with self._cond:
            if generation != self._generation:
                raise KubeletError("fake kubelet: this kubelet instance has stopped")
            res = self._resources.setdefault(client.resource, _Resource())
            old, res.client = res.client, client
            if old is not None and self.order == "legacy":
                res.superseded.append(old)
            res.state = dataclasses.replace(
                res.state,
                registered=True,
                connected=True,
                endpoint=client.endpoint,
                options=options,
                options_source=source,
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
            shown = "none" if options is None else str(options).replace("\n", " ").strip()
            detail = f"endpoint={client.endpoint!r} options={{{shown}}} from {source}"
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
        topology = {
            d.ID: tuple(n.ID for n in d.topology.nodes)
            for d in response.devices
            if d.HasField("topology") and d.topology.nodes
        }
        now = time.monotonic()
        with self._cond:
            res = self._resources.get(client.resource)
            # 1.20's callback is keyed by resource name: a replaced endpoint still counts.
            if res is None or (res.client is not client and client not in res.superseded):
                self._event("ignored", client.resource, f"snapshot from {client.endpoint!r}")
                return
            res.state = dataclasses.replace(res.state, devices=devices, topology=topology)
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
                if res is not None and client in res.superseded:
                    res.superseded.remove(client)
                self._event("stream-ended", client.resource, f"{client.endpoint!r}: {reason}")
            self._cond.notify_all()
        self._drop(client)
