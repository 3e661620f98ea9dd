"""Serve one resource's socket and keep it registered with the kubelet.

The kubelet never re-dials a plugin. A new kubelet deletes every socket in the
plugin directory and then creates a fresh ``kubelet.sock``; a plugin must notice
and register again, on a new server (gRPC cannot re-bind a started server), on
a fresh socket name (the kubelet keys connections by socket path, so reusing a
name races a late disconnect of the old one). This module is that loop:
serve → register (retrying forever with bounded backoff) → watch the directory
→ on a restart, tear down and start over. It stops only when told to.

Kubelets from 1.25 on dial back and ask GetDevicePluginOptions before they
answer Register; older ones (1.20) answer at once, dial later and take the
options from the RegisterRequest. So the request carries the same options the
servicer answers with. The server caps its connections (idle ones are closed
after a while) and its message size, so a local client cannot take the
descriptors or the memory the kubelet's calls need.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from macvtapdp import naming
from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from macvtapdp.config import Resource
from macvtapdp.errors import RegistrationError
from macvtapdp.linux.inotify import IN_CREATE, IN_MOVED_TO, DirWatch
from macvtapdp.plugin.observe import Observer, Quiet
from macvtapdp.plugin.servicer import options
from macvtapdp.statefile import StateFile

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
REGISTER_TIMEOUT = 10.0  # the kubelet answers only after dialing back (its own 10 s dial)
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
SAFETY_CHECK = 5.0  # re-check the directory even if inotify said nothing
WORKERS = 8  # > MAX_STREAMS + concurrent unary calls
_CHANNEL_OPTIONS = [
    # A channel of our own: the global subchannel pool would carry the failed
    # connection's reconnect backoff over to the next attempt.
    ("grpc.use_local_subchannel_pool", 1),
]
SERVER_OPTIONS = [
    ("grpc.max_allowed_incoming_connections", 64),
    ("grpc.max_connection_idle_ms", 30_000),  # the kubelet's holds a stream: never idle
    ("grpc.max_receive_message_length", 1 << 20),
]


def inode(path: str) -> int | None:
    """The inode of socket ``path``, or None if there is no socket there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def register(kubelet_socket: str, endpoint: str, resource_name: str) -> None:
    """Register ``endpoint`` for ``resource_name``; the kubelet dials back before answering."""
    target = f"unix:{kubelet_socket}"
    try:
        with grpc.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
            api_pb2_grpc.RegistrationStub(channel).Register(
                api_pb2.RegisterRequest(
                    version=API_VERSION,
                    endpoint=endpoint,
                    resource_name=resource_name,
                    options=options(),
                ),
                timeout=REGISTER_TIMEOUT,
            )
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        detail = err.details() if isinstance(err, grpc.Call) else str(err)
        raise RegistrationError(f"{code.name if code else 'error'}: {detail}") from err


def _created(events: list[tuple[int, str]], filename: str) -> bool:
    return any(name == filename and mask & (IN_CREATE | IN_MOVED_TO) for mask, name in events)


class Lifecycle:
    """The serve/register/watch loop of one resource; ``run`` returns on ``stop``."""

    def __init__(
        self,
        resource: Resource,
        plugin_dir: str,
        add_servicer: Callable[[grpc.Server], None],
        stop: threading.Event,
        watch: DirWatch,
        state: StateFile,
        observer: Observer | None = None,
    ) -> None:
        self.resource = resource
        self.plugin_dir = plugin_dir
        self.kubelet_socket = os.path.join(plugin_dir, naming.KUBELET_SOCKET)
        self._add_servicer = add_servicer
        self._stop = stop
        self._watch = watch
        self._state = state
        self._observer = observer or Quiet()
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="grpc")

    def run(self) -> None:
        os.makedirs(self.plugin_dir, mode=0o750, exist_ok=True)
        self._remove_stale_sockets()
        try:
            while not self._stop.is_set():
                served = self._serve()
                if served is None:
                    continue
                server, path = served
                try:
                    registered = self._register(path)
                    if registered is not None:
                        self._watch_until_restart(path, registered)
                finally:
                    self._teardown(server, path)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _remove_stale_sockets(self) -> None:
        """Remove sockets an earlier start of this resource left (crash, kill -9)."""
        for entry in os.scandir(self.plugin_dir):
            own = naming.is_own_socket(self.resource.name, entry.name)
            if own and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                os.unlink(entry.path)
                log.info("removed stale socket %s", entry.name)

    def _serve(self) -> tuple[grpc.Server, str] | None:
        endpoint = naming.socket_name(self.resource.name)
        path = os.path.join(self.plugin_dir, endpoint)
        server = grpc.server(self._pool, options=SERVER_OPTIONS, maximum_concurrent_rpcs=None)
        self._add_servicer(server)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as err:
            log.error("cannot listen on %s: %s; retrying in %.0fs", path, err, BACKOFF_MAX)
            self._stop.wait(BACKOFF_MAX)
            return None
        server.start()
        log.info("serving on %s", endpoint)
        self._state.update(socket=path, kubelet="not registered")
        return server, path

    def _register(self, path: str) -> int | None:
        """Register until it works; return the kubelet socket's inode, None to start over."""
        endpoint = os.path.basename(path)
        delay = BACKOFF_FIRST
        waiting_said = False
        while not self._stop.is_set():
            # Forget what happened so far: after this, a kubelet socket CREATE means a
            # kubelet newer than the one we are about to register with.
            self._watch.wait(0)
            if inode(path) is None:
                log.info("socket %s vanished before registration; serving again", endpoint)
                return None
            kubelet = inode(self.kubelet_socket)
            if kubelet is None:
                if not waiting_said:
                    log.info("waiting for the kubelet at %s", self.kubelet_socket)
                    self._state.update(kubelet="waiting for the kubelet")
                    waiting_said = True
                self._wait_for_kubelet(SAFETY_CHECK)
                delay = BACKOFF_FIRST
                continue
            try:
                register(self.kubelet_socket, endpoint, self.resource.resource_name)
            except RegistrationError as err:
                log.warning("registration failed (%s); retrying in %.2fs", err, delay)
                self._state.update(kubelet=f"registration failed: {err}")
                if self._wait_for_kubelet(delay):
                    delay = BACKOFF_FIRST  # a new kubelet socket: try again now
                else:
                    delay = min(delay * 2, BACKOFF_MAX)
                continue
            log.info("registered %s with the kubelet", self.resource.resource_name)
            self._observer.registered()
            self._state.update(kubelet="registered", registered=time.time())
            return kubelet
        return None

    def _wait_for_kubelet(self, timeout: float) -> bool:
        """Wait up to ``timeout``; True as soon as a kubelet socket is created."""
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if _created(self._watch.wait(remaining), naming.KUBELET_SOCKET):
                return True
        return False

    def _watch_until_restart(self, path: str, kubelet: int) -> None:
        """Return when the kubelet restarted (our socket gone, or a new kubelet socket)."""
        endpoint = os.path.basename(path)
        gone_said = False
        while not self._stop.is_set():
            events = self._watch.wait(SAFETY_CHECK)
            if self._stop.is_set():
                return
            if inode(path) is None:
                log.info("kubelet restart seen: %s was removed; registering again", endpoint)
                return
            now = inode(self.kubelet_socket)
            # inotify is the reliable signal: a new kubelet.sock may reuse the old inode
            if now is not None and (now != kubelet or _created(events, naming.KUBELET_SOCKET)):
                log.info("kubelet restart seen: new %s; registering again", naming.KUBELET_SOCKET)
                return
            if now is None and not gone_said:
                log.info("the kubelet's socket is gone; waiting for it to come back")
            gone_said = now is None

    def _teardown(self, server: grpc.Server, path: str) -> None:
        """Stop serving (ends open streams) and remove our socket."""
        grace = 1.0 if self._stop.is_set() else None
        server.stop(grace).wait(2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
