"""The Device Plugin API servicer for one resource.

It knows the resource's devices and their health, and turns them into the
kubelet's messages; everything that touches the kernel sits behind the small
``Devices`` interface (the allocator). gRPC's thread server gives every open
ListAndWatch stream a worker for its whole life, so the number of concurrent
streams is capped well below the pool size: Allocate can never be starved.

Requests are untrusted input: device IDs are quoted and cut in every log line
and error message, and a request asking for more devices than the resource has
is refused whole (the server also refuses messages over 1 MiB).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NoReturn, Protocol

import grpc

from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from macvtapdp.config import Resource
from macvtapdp.errors import AllocationError, LinkMissingError, LowerLinkBusy
from macvtapdp.logs import quoted
from macvtapdp.plugin.allocator import Allocation
from macvtapdp.plugin.health import Health, Snapshot
from macvtapdp.plugin.observe import Observer, Quiet

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
MAX_STREAMS = 4  # the kubelet holds one
_SHOWN_IDS = 5


class Devices(Protocol):
    """What the servicer needs of the kernel side (``allocator.Allocator``)."""

    def allocate(self, device_ids: Sequence[str]) -> list[Allocation]: ...

    def pre_start(self, device_ids: Sequence[str]) -> list[str]: ...


class DevicePluginServicer(api_pb2_grpc.DevicePluginServicer):
    """Serves ``resource``'s devices: all Healthy or all Unhealthy, with the link."""

    def __init__(
        self,
        resource: Resource,
        health: Health,
        devices: Devices,
        observer: Observer | None = None,
    ) -> None:
        self.resource = resource
        self.health = health
        self.devices = devices
        self.observer = observer or Quiet()
        self._ids = resource.device_ids()
        self._known = frozenset(self._ids)
        self._lists: dict[Snapshot, api_pb2.ListAndWatchResponse] = {}
        self._streams = 0
        self._streams_lock = threading.Lock()

    def _list(self, snapshot: Snapshot) -> api_pb2.ListAndWatchResponse:
        """The full device list for ``snapshot`` (built once per distinct snapshot)."""
        key = Snapshot(snapshot.healthy, snapshot.numa_nodes)
        found = self._lists.get(key)
        if found is None:
            health = HEALTHY if snapshot.healthy else UNHEALTHY
            topology = None
            if snapshot.numa_nodes is not None:
                topology = api_pb2.TopologyInfo(
                    nodes=[api_pb2.NUMANode(ID=n) for n in snapshot.numa_nodes]
                )
            found = api_pb2.ListAndWatchResponse(
                devices=[api_pb2.Device(ID=i, health=health, topology=topology) for i in self._ids]
            )
            self._lists[key] = found
        return found

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return options()

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        with self._streams_lock:
            if self._streams >= MAX_STREAMS:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"at most {MAX_STREAMS} ListAndWatch streams at once",
                )
            self._streams += 1
        active = threading.Event()
        active.set()

        def ended() -> None:
            active.clear()
            self.health.wake()

        try:
            if not context.add_callback(ended):
                return
            version, snapshot = self.health.get()
            sent = self._list(snapshot)
            yield sent
            while (change := self.health.wait(version, active)) is not None:
                version, snapshot = change
                now = self._list(snapshot)
                if now is not sent:
                    sent = now
                    yield sent
        finally:
            with self._streams_lock:
                self._streams -= 1

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        """Not advertised; answers sensibly anyway: the required IDs, then the first free."""
        responses = []
        for req in request.container_requests:
            chosen = list(dict.fromkeys(req.must_include_deviceIDs))
            chosen += [i for i in req.available_deviceIDs if i not in chosen]
            responses.append(
                api_pb2.ContainerPreferredAllocationResponse(
                    deviceIDs=chosen[: max(req.allocation_size, len(req.must_include_deviceIDs))]
                )
            )
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        problem = self._request_problem(request)
        if problem is not None:
            code, message = problem
            log.warning("refused Allocate: %s", message)
            self.observer.allocated("failed", 0.0)
            context.abort(code, message)
        ids = [i for req in request.container_requests for i in req.devices_ids]
        try:
            done = self.devices.allocate(ids)
        except Exception as err:
            self.observer.allocated("failed", 0.0, len(ids))
            self._abort(context, "Allocate", ids, err)
        for allocation in done:
            result = "created" if allocation.created else "reused"
            self.observer.allocated(result, allocation.seconds)
            log.info(
                "allocated %s: %s (%s in %.2f ms)",
                allocation.device,
                allocation.path,
                result,
                allocation.seconds * 1000,
            )
        paths = iter(a.path for a in done)
        response = api_pb2.AllocateResponse()
        for req in request.container_requests:
            container = response.container_responses.add()
            for _ in req.devices_ids:
                path = next(paths)
                container.devices.add(container_path=path, host_path=path, permissions="rw")
        return response

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        """Before every container start: the paths given at Allocate must still be right."""
        ids = list(request.devices_ids)
        unknown = [i for i in dict.fromkeys(ids) if i not in self._known]
        if unknown or len(ids) > len(self._ids):
            message = f"unknown device IDs for {self.resource.resource_name}: {_some(unknown)}"
            log.warning("refused PreStartContainer: %s", message)
            context.abort(grpc.StatusCode.NOT_FOUND, message)
        try:
            notes = self.devices.pre_start(ids)
        except Exception as err:
            self._abort(context, "PreStartContainer", ids, err)
        for note in notes:
            log.info("container start: %s", note)
        return api_pb2.PreStartContainerResponse()

    def _abort(
        self, context: grpc.ServicerContext, call: str, ids: Sequence[str], err: Exception
    ) -> NoReturn:
        """End the call with the status ``err`` deserves (and one log line)."""
        which = _some(ids)
        if isinstance(err, LinkMissingError):
            log.warning("refused %s of %s: %s", call, which, err)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        if isinstance(err, LowerLinkBusy):
            log.warning("refused %s of %s: %s", call, which, err)
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if err.passthru
                else (grpc.StatusCode.FAILED_PRECONDITION)
            )
            context.abort(code, str(err))
        if isinstance(err, AllocationError):
            log.error("%s of %s failed: %s", call, which, err)
            code = (
                grpc.StatusCode.INTERNAL
                if call == "Allocate"
                else (grpc.StatusCode.FAILED_PRECONDITION)
            )
            context.abort(code, str(err))
        log.exception("%s of %s failed unexpectedly", call, which)
        context.abort(grpc.StatusCode.INTERNAL, f"{call} failed: {err}")

    def _request_problem(
        self, request: api_pb2.AllocateRequest
    ) -> tuple[grpc.StatusCode, str] | None:
        """Why ``request`` must be refused before anything is created, if it must."""
        name = self.resource.resource_name
        if not request.container_requests:
            return grpc.StatusCode.INVALID_ARGUMENT, "Allocate request has no container requests"
        ids: list[str] = []
        for n, req in enumerate(request.container_requests):
            if not req.devices_ids:
                return grpc.StatusCode.INVALID_ARGUMENT, f"container request {n} has no device IDs"
            ids.extend(req.devices_ids)
        if len(ids) > len(self._ids):
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(ids)} device IDs asked; {name} has {len(self._ids)} devices",
            )
        unknown = [i for i in dict.fromkeys(ids) if i not in self._known]
        if unknown:
            return grpc.StatusCode.NOT_FOUND, f"unknown device IDs for {name}: {_some(unknown)}"
        twice = [i for i, count in Counter(ids).items() if count > 1]
        if twice:
            return grpc.StatusCode.INVALID_ARGUMENT, f"device IDs asked twice: {_some(twice)}"
        return None


def options() -> api_pb2.DevicePluginOptions:
    """PreStartContainer before every container start: it checks the paths Allocate gave."""
    return api_pb2.DevicePluginOptions(
        pre_start_required=True, get_preferred_allocation_available=False
    )


def _some(ids: Sequence[str]) -> str:
    """A bounded, quoted list for logs and error messages (requests can be huge)."""
    shown = ", ".join(quoted(i) for i in ids[:_SHOWN_IDS])
    return shown + (f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else "")
