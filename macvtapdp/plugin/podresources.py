"""The kubelet's PodResources API v1, asked one thing: which of a resource's devices pods hold.

``List`` answers, for every active pod (its containers still running, even while
the pod terminates), the device IDs each container holds per resource. The kubelet
frees the devices of a pod that is gone at that very call (``UpdateAllocatedDevices``),
so the answer is as fresh as the kubelet's own view.

Each call opens a channel of its own and closes it: one call per resource every
few seconds costs a connect of a local socket, and a kubelet that restarted (a
new socket file) is reached at once, without gRPC's reconnect backoff. Any
failure, no socket or an error answer alike, is ``Unreachable``: the caller must
not act on what it does not know.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc

from macvtapdp import logs
from macvtapdp.api.podresources.v1 import api_pb2, api_pb2_grpc
from macvtapdp.errors import Unreachable

log = logging.getLogger(__name__)

TIMEOUT = 5.0  # a local socket answers in milliseconds; the kubelet's own client allows 10 s
MAX_MESSAGE = 16 << 20  # the kubelet's podresources client's limit (a node with many pods)
_CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # no reconnect backoff carried between calls
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


class PodResources:
    """A client of ``socket_path``; ``held`` blocks at most ``timeout`` seconds."""

    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._call: grpc.Future[api_pb2.ListPodResourcesResponse] | None = None
        self._cancelled = False

    def held(self, resource_name: str) -> frozenset[str]:
        """The IDs of ``resource_name``'s devices that active pods hold now.

        Raises Unreachable if the API cannot be reached, answers an error, or
        the call was cancelled.
        """
        response = self._list()
        return frozenset(
            dev_id
            for pod in response.pod_resources
            for container in pod.containers
            for devices in container.devices
            if devices.resource_name == resource_name
            for dev_id in devices.device_ids
        )

    def cancel(self) -> None:
        """End the call in flight, and refuse further ones (shutdown)."""
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()

    def _list(self) -> api_pb2.ListPodResourcesResponse:
        target = f"unix:{self.socket_path}"
        with grpc.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
            stub = api_pb2_grpc.PodResourcesListerStub(channel)
            with self._lock:
                if self._cancelled:
                    raise Unreachable("the PodResources client is shutting down")
                call = self._call = stub.List.future(
                    api_pb2.ListPodResourcesRequest(), timeout=self.timeout
                )
            try:
                return call.result()
            except grpc.FutureCancelledError as err:
                raise Unreachable("the PodResources client is shutting down") from err
            except grpc.RpcError as err:
                raise self._unreachable(err) from err
            finally:
                with self._lock:
                    self._call = None

    def _unreachable(self, err: grpc.RpcError) -> Unreachable:
        """A short reason (for ``status`` too); gRPC's own words go to the debug log."""
        code = err.code() if isinstance(err, grpc.Call) else None
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        log.debug("PodResources List on %s: %s %s", self.socket_path, code, details)
        if code is grpc.StatusCode.UNAVAILABLE:
            if not os.path.exists(self.socket_path):
                return Unreachable(f"no socket at {self.socket_path}")
            return Unreachable(f"{self.socket_path} does not answer")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unreachable(f"no answer from {self.socket_path} in {self.timeout:g} s")
        name = code.name if code is not None else "an error"
        return Unreachable(f"the kubelet answered List with {name}: {logs.quoted(details or '')}")
