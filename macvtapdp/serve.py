"""One resource's process: ``macvtapdp serve <name>``.

Wires the pieces together: the lower link's watcher feeds the health every
ListAndWatch stream reports, the allocator makes macvtaps, and the lifecycle
loop keeps the socket registered. SIGTERM and SIGINT end the streams (so the
kubelet sees a clean end and marks the devices unhealthy at once), stop the
server, remove the socket, and return 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import grpc

from macvtapdp import logs, naming
from macvtapdp.allocator import Allocator
from macvtapdp.api.v1beta1 import api_pb2_grpc
from macvtapdp.config import Resource
from macvtapdp.dirwatch import DirWatch
from macvtapdp.errors import PermanentError
from macvtapdp.lifecycle import Lifecycle
from macvtapdp.linkwatch import LinkState, LinkWatcher
from macvtapdp.rtnl import Rtnl
from macvtapdp.servicer import DevicePluginServicer, Health
from macvtapdp.state import StateFile

log = logging.getLogger("macvtapdp")


def serve(resource: Resource, plugin_dir: str, state_path: str | None = None) -> int:
    """Serve ``resource`` until SIGTERM/SIGINT; return the exit code.

    ``state_path``, if given, is kept up to date for ``macvtapdp status``.
    """
    longest = naming.max_name_length(plugin_dir)
    if len(resource.name) > longest:
        raise PermanentError(
            f"resource name {resource.name!r} is too long for plugin directory {plugin_dir}: "
            f"its socket path would exceed {naming.MAX_SOCKET_PATH} bytes "
            f"(at most {max(longest, 0)} characters here)"
        )
    logs.configure(resource.name)
    os.umask(0o077)  # only root (the kubelet) may use our socket
    log.info(
        "serving %s: %d devices, macvtap mode %s on lower link %s, plugin directory %s",
        resource.resource_name,
        resource.capacity,
        resource.mode.value,
        resource.master,
        plugin_dir,
    )
    stop = threading.Event()
    health = Health()
    state = StateFile(state_path)

    def link_changed(link: LinkState) -> None:
        health.set(link.healthy, link.describe())
        verdict = "Healthy" if link.healthy else "Unhealthy"
        log.info("lower link %s is %s: devices %s", resource.master, link.describe(), verdict)
        state.update(link=link.describe(), healthy=link.healthy)

    rtnl = Rtnl()
    servicer = DevicePluginServicer(resource, health, Allocator(resource, rtnl))
    watcher = LinkWatcher(resource.master, link_changed)
    with DirWatch(plugin_dir) as watch:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()
            health.close()
            watch.wake()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        def add_servicer(server: grpc.Server) -> None:
            api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, server)

        watcher.start()
        try:
            Lifecycle(resource, plugin_dir, add_servicer, stop, watch, state).run()
        finally:
            watcher.stop()
            rtnl.close()
            state.remove()
    log.info("stopped; socket removed")
    return 0
