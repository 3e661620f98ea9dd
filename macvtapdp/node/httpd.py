"""A small HTTP/1.1 server for GET and HEAD that no client can stall.

The endpoint listens on the node's network (hostNetwork), where anyone may
connect, and the kubelet's probes must get through whatever else is
connected. So, on one asyncio loop: every exchange has a deadline (request
head within ``head_timeout``, the whole answer within ``deadline``; then the
connection is dropped, so a client that stops reading costs nothing after
it), the request head is bounded, connections are capped in total and per
peer address, and every answer closes its connection. Handlers are
coroutines; blocking work goes to threads (``Shared``), never onto the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Generic, TypeVar

log = logging.getLogger("macvtapdp")

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # names in lower case


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Limits:
    head_timeout: float = 5.0
    deadline: float = 10.0
    max_head: int = 8192
    connections: int = 64
    per_peer: int = 16


class Shared(Generic[T]):
    """Runs ``fn`` in a thread once for all callers waiting at the same time.

    Ten scrapes at once read the files once; a caller that gives up (its
    deadline) does not cancel the work of the others, and work that hangs
    holds one thread, not one per caller.
    """

    def __init__(self, fn: Callable[[], T], pool: concurrent.futures.Executor) -> None:
        self._fn = fn
        self._pool = pool
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._running is None:
            running = asyncio.get_running_loop().run_in_executor(self._pool, self._fn)
            self._running = running

            def done(_: object) -> None:
                self._running = None

            running.add_done_callback(done)
        return await asyncio.shield(self._running)


class Server:
    """Routes ``GET``/``HEAD`` of each path in ``routes`` to its handler."""

    def __init__(self, routes: Mapping[str, Handler], limits: Limits | None = None) -> None:
        self.routes = routes
        self.limits = limits or Limits()
        self._active = 0
        self._peers: Counter[str] = Counter()

    @property
    def active(self) -> int:
        """Connections open now."""
        return self._active

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._connection, host, port, limit=self.limits.max_head, reuse_address=True
        )

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        limits = self.limits
        if self._active >= limits.connections or self._peers[address] >= limits.per_peer:
            _drop(writer)
            return
        self._active += 1
        self._peers[address] += 1
        try:
            async with asyncio.timeout(limits.deadline):
                await self._exchange(reader, writer)
                writer.close()
                await writer.wait_closed()
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            _drop(writer)
        except Exception:
            log.exception("metrics endpoint: request failed")
            _drop(writer)
        finally:
            self._active -= 1
            self._peers[address] -= 1
            if not self._peers[address]:
                del self._peers[address]

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(self.limits.head_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        request = _parse(head)
        if request is None:
            response = Response.text(HTTPStatus.BAD_REQUEST, "bad request\n")
        elif request.method not in ("GET", "HEAD"):
            response = Response.text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD\n")
        elif (handler := self.routes.get(request.path)) is None:
            response = Response.text(HTTPStatus.NOT_FOUND, "not found\n")
        else:
            try:
                response = await handler(request)
            except Exception:
                log.exception("metrics endpoint: %s %s failed", request.method, request.path)
                response = Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        writer.write(_head(response, allow=response.status == HTTPStatus.METHOD_NOT_ALLOWED))
        if request is None or request.method != "HEAD":
            writer.write(response.body)
        await writer.drain()


def _drop(writer: asyncio.StreamWriter) -> None:
    """Close now, unsent data discarded: a reset, not a kernel left flushing to a stalled peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _parse(head: bytes) -> Request | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    line, *rest = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, _version = parts
    headers = {}
    for raw in rest:
        if not raw:
            continue
        name, sep, value = raw.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return Request(method, target.split("?", 1)[0], headers)


def _head(response: Response, *, allow: bool) -> bytes:
    status = HTTPStatus(response.status)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def serve_forever(
    server: Server, host: str, port: int, stop: asyncio.Event, ready: Callable[[], None]
) -> None:
    """Listen on ``host:port`` until ``stop`` is set (OSError if the address is taken)."""
    listening = await server.start(host, port)
    ready()
    async with listening:
        await stop.wait()
        listening.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await listening.wait_closed()
