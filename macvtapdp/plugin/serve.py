"""One resource's process: wires the pieces together.

The lower link's watcher feeds the health every ListAndWatch stream reports,
the allocator makes macvtaps, the kubelet lifecycle keeps the socket
registered, and the sweep deletes the macvtaps pods left behind. SIGTERM and
SIGINT end the streams (so the kubelet sees a clean end and marks the devices
unhealthy at once), stop the sweep, stop the server, remove the socket, and
return 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType

import grpc

from macvtapdp import naming
from macvtapdp.api.v1beta1 import api_pb2_grpc
from macvtapdp.errors import PermanentError
from macvtapdp.linux.inotify import DirWatch
from macvtapdp.linux.link import Link
from macvtapdp.linux.netlink import Netlink
from macvtapdp.plugin import sweep, topology
from macvtapdp.plugin.allocator import Allocator, Records
from macvtapdp.plugin.health import Health
from macvtapdp.plugin.kubelet import Lifecycle
from macvtapdp.plugin.linkwatch import LinkState, LinkWatcher
from macvtapdp.plugin.macvtap import Macvtaps
from macvtapdp.plugin.observe import Observer, Quiet
from macvtapdp.plugin.servicer import DevicePluginServicer
from macvtapdp.rundir import Layout
from macvtapdp.settings import Serve, check_sweep_grace
from macvtapdp.statefile import StateFile

log = logging.getLogger("macvtapdp")


class _Lower:
    """The allocator's view of the lower link: the watcher's last state, or a fresh read."""

    def __init__(self, watcher: LinkWatcher) -> None:
        self._watcher = watcher

    def current(self) -> Link | None:
        return self._watcher.state.link

    def refresh(self) -> Link | None:
        return self._watcher.refresh().link


def check(settings: Serve) -> None:
    """Refuse what can never work (PermanentError), before anything starts."""
    resource, plugin_dir = settings.resource, settings.plugin.plugin_dir
    check_sweep_grace(settings.plugin.sweep_grace)
    longest = naming.max_name_length(plugin_dir)
    if len(resource.name) > longest:
        raise PermanentError(
            f"resource name {resource.name!r} is too long for plugin directory {plugin_dir}: "
            f"its socket path would exceed {naming.MAX_SOCKET_PATH} bytes "
            f"(at most {max(longest, 0)} characters here)"
        )


def serve(settings: Serve) -> int:
    """Serve ``settings.resource`` until SIGTERM/SIGINT; return the exit code."""
    check(settings)
    resource, plugin = settings.resource, settings.plugin
    layout = Layout(plugin.run_dir)
    os.umask(0o077)  # only root (the kubelet) may use our socket
    log.info(
        "serving %s: %d devices, macvtap mode %s on lower link %s, plugin directory %s",
        resource.resource_name,
        resource.capacity,
        resource.mode.value,
        resource.lower,
        plugin.plugin_dir,
    )
    for directory in (layout.state_dir, layout.taps_dir):  # made by run; by hand, maybe not
        with contextlib.suppress(OSError):
            os.makedirs(directory, mode=0o700, exist_ok=True)
    stop = threading.Event()
    health = Health()
    state = StateFile(layout.state_file(resource.name))
    state.update(capacity=resource.capacity, lower=resource.lower)

    observer: Observer = Quiet()
    if plugin.metrics:  # prometheus_client is loaded only then
        from macvtapdp.plugin import metrics

        observer = metrics.observer(settings)

    def link_changed(link: LinkState) -> None:
        numa = topology.numa_nodes(link.link, plugin.numa_sysfs) if plugin.topology else None
        health.set(healthy=link.healthy, reason=link.describe(), numa_nodes=numa)
        observer.health(link.healthy, resource.capacity, link.up)
        verdict = "Healthy" if link.healthy else "Unhealthy"
        on = f", NUMA node {','.join(map(str, numa))}" if numa else ""
        log.info("lower link %s is %s%s: devices %s", resource.lower, link.describe(), on, verdict)
        state.update(link=link.describe(), healthy=link.healthy)

    netlink = Netlink()
    allocator: Allocator | None = None

    def gone(link: Link) -> None:
        if allocator is not None:
            allocator.gone(link)

    watcher = LinkWatcher(
        resource.lower, netlink, link_changed, gone, kernel_filter=plugin.link_filter
    )
    macvtaps = Macvtaps(netlink, sysfs=plugin.sysfs)
    records = Records(layout.taps_file(resource.name))
    allocator = Allocator(resource, macvtaps, _Lower(watcher), records)
    servicer = DevicePluginServicer(resource, health, allocator, observer)
    with DirWatch(plugin.plugin_dir) as watch:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()
            health.close()
            watch.wake()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # The kernel may hand SIGTERM to any of our threads, but Python runs the handler
        # only once the main thread runs again: without this the main thread would sleep on
        # in its wait (up to 5 s) before it even noticed.
        signal.set_wakeup_fd(watch.wake_fd, warn_on_full_buffer=False)

        def add_servicer(server: grpc.Server) -> None:
            api_pb2_grpc.add_DevicePluginServicer_to_server(servicer, server)

        watcher.start()
        sweeper = sweep.start(resource, plugin, allocator, state, observer)
        try:
            Lifecycle(resource, plugin.plugin_dir, add_servicer, stop, watch, state, observer).run()
        finally:
            if sweeper is not None:
                sweeper.stop()
            watcher.stop()
            records.flush()
            macvtaps.close()
            netlink.close()
            state.remove()
            signal.set_wakeup_fd(-1)
    log.info("stopped; socket removed")
    return 0
