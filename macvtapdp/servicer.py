"""The Device Plugin API servicer for one resource.

It knows the resource's devices and the lower link's health, and turns them
into the kubelet's messages; everything that touches the kernel sits behind the
small ``Allocator`` interface. gRPC's thread server gives every open
ListAndWatch stream a worker for its whole life, so the number of concurrent
streams is capped well below the pool size: Allocate can never be starved.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Protocol

import grpc

from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from macvtapdp.config import Resource
from macvtapdp.errors import AllocationError, LinkMissingError

log = logging.getLogger(__name__)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
WORKERS = 8
MAX_STREAMS = 4  # the kubelet holds one; status probes hold one briefly
_SHOWN_IDS = 5


class Allocator(Protocol):
    """Makes sure each device's macvtap exists; returns its /dev/tapN, in order."""

    def allocate(self, device_ids: Sequence[str]) -> list[str]: ...


class Health:
    """The lower link's health, broadcast to every ListAndWatch stream."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._healthy = False
        self._reason = "not checked yet"
        self._version = 0
        self._closed = False

    def set(self, healthy: bool, reason: str) -> None:
        """Record the link's state; streams send an update if health flipped."""
        with self._cond:
            self._reason = reason
            if healthy != self._healthy:
                self._healthy = healthy
                self._version += 1
                self._cond.notify_all()

    def get(self) -> tuple[int, bool, str]:
        with self._cond:
            return self._version, self._healthy, self._reason

    def wait(self, version: int, active: threading.Event) -> tuple[int, bool] | None:
        """Block until health differs from ``version``; None once closed or inactive."""
        with self._cond:
            while self._version == version and not self._closed and active.is_set():
                self._cond.wait()
            if self._closed or not active.is_set():
                return None
            return self._version, self._healthy

    def wake(self) -> None:
        """Make every waiting stream re-check whether it is still active."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """End every stream (shutdown): they return, and the kubelet sees the end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class DevicePluginServicer(api_pb2_grpc.DevicePluginServicer):
    """Serves ``resource``'s devices: all Healthy or all Unhealthy, with the link."""

    def __init__(self, resource: Resource, health: Health, allocator: Allocator) -> None:
        self.resource = resource
        self.health = health
        self.allocator = allocator
        ids = resource.device_ids()
        self._known = frozenset(ids)
        self._lists = {
            healthy: api_pb2.ListAndWatchResponse(
                devices=[
                    api_pb2.Device(ID=i, health=HEALTHY if healthy else UNHEALTHY) for i in ids
                ]
            )
            for healthy in (True, False)
        }
        self._streams = 0
        self._streams_lock = threading.Lock()

    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=False
        )

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
            version, healthy, _ = self.health.get()
            yield self._lists[healthy]
            while (change := self.health.wait(version, active)) is not None:
                version, now_healthy = change
                if now_healthy != healthy:
                    healthy = now_healthy
                    yield self._lists[healthy]
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
            context.abort(code, message)
        ids = [i for req in request.container_requests for i in req.devices_ids]
        try:
            paths = iter(self.allocator.allocate(ids))
        except LinkMissingError as err:
            log.warning("refused Allocate of %s: %s", ", ".join(ids), err)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except AllocationError as err:
            log.error("Allocate of %s failed: %s", ", ".join(ids), err)
            context.abort(grpc.StatusCode.INTERNAL, str(err))
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
        return api_pb2.PreStartContainerResponse()

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
        unknown = [i for i in dict.fromkeys(ids) if i not in self._known]
        if unknown:
            return grpc.StatusCode.NOT_FOUND, f"unknown device IDs for {name}: {_some(unknown)}"
        twice = [i for i, count in Counter(ids).items() if count > 1]
        if twice:
            return grpc.StatusCode.INVALID_ARGUMENT, f"device IDs asked twice: {_some(twice)}"
        return None


def _some(ids: Sequence[str]) -> str:
    """A bounded list for error messages (requests can be huge)."""
    shown = ", ".join(f'"{i}"' for i in ids[:_SHOWN_IDS])
    return shown + (f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else "")
