"""The endpoint's HTTP server: answers, and clients that cannot stall it (real sockets)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping

from harness.processes import until
from macvtapdp.node.httpd import Handler, Limits, Request, Response, Server, Shared

BIG = 64 << 20  # far more than the socket buffers hold


async def hello(request: Request) -> Response:
    return Response.text(200, f"hello {request.headers.get('x-who', 'you')}\n")


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug")


async def big(request: Request) -> Response:
    return Response(200, bytes(BIG))


class Running:
    """A Server on 127.0.0.1 (an ephemeral port) in a thread with its own loop."""

    def __init__(self, server: Server, port: int) -> None:
        self.server = server
        self.port = port

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def ask(self, raw: bytes) -> bytes:
        with self.connect() as sock:
            sock.sendall(raw)
            return read_all(sock)

    def get(self, path: str) -> tuple[int, bytes]:
        answer = self.ask(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body


def read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def reset_soon(sock: socket.socket, within: float = 10.0) -> bool:
    """Whether ``sock``'s peer resets it (or closes) within ``within`` while it is read."""
    deadline = time.monotonic() + within
    sock.settimeout(1.0)
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


@contextlib.contextmanager
def running(routes: Mapping[str, Handler], limits: Limits | None = None) -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    server = Server(routes, limits or Limits())
    started: concurrent.futures.Future[int] = concurrent.futures.Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        listening = loop.run_until_complete(server.start("127.0.0.1", 0))
        started.set_result(listening.sockets[0].getsockname()[1])
        loop.run_forever()
        listening.close()
        loop.run_until_complete(listening.wait_closed())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield Running(server, started.result(10))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_get_head_and_the_errors() -> None:
    with running({"/hello": hello, "/broken": broken}) as srv:
        assert srv.get("/hello?x=1") == (200, b"hello you\n")
        assert srv.get("/broken") == (500, b"internal error\n")
        answer = srv.ask(b"GET /hello HTTP/1.1\r\nX-Who: me\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello me\n")
        assert b"Connection: close\r\n" in answer and b"Content-Length: 9\r\n" in answer
        head = srv.ask(b"HEAD /hello HTTP/1.1\r\n\r\n")
        assert head.endswith(b"\r\n\r\n") and b"Content-Length: 10\r\n" in head
        assert srv.get("/nope")[0] == 404
        posted = srv.ask(b"POST /hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in posted
        assert srv.ask(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert srv.ask(b"GET / HTTP/1.1\r\nno colon\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_an_oversized_head_is_dropped_unanswered() -> None:
    with running({"/hello": hello}, Limits(max_head=1024)) as srv:
        assert srv.ask(b"GET /hello HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n") == b""
        assert srv.get("/hello")[0] == 200


def test_idle_and_slow_clients_neither_block_others_nor_stay() -> None:
    limits = Limits(head_timeout=0.5, deadline=1.0, per_peer=8)
    with running({"/hello": hello}, limits) as srv:
        idle = [srv.connect() for _ in range(4)]
        slow = srv.connect()
        slow.sendall(b"GET /hel")  # and never the rest
        try:
            assert until(lambda: srv.server.active == 5, 10)
            assert srv.get("/hello") == (200, b"hello you\n")
            for sock in [*idle, slow]:  # each dropped at its deadline, unanswered
                assert read_all(sock) == b""
            assert until(lambda: srv.server.active == 0, 10)
        finally:
            for sock in [*idle, slow]:
                sock.close()


def test_a_client_that_stops_reading_is_dropped_at_the_deadline() -> None:
    limits = Limits(deadline=1.0)
    with running({"/hello": hello, "/big": big}, limits) as srv, srv.connect() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big HTTP/1.1\r\n\r\n")  # then reads nothing
        assert until(lambda: srv.server.active == 1, 10)
        assert srv.get("/hello")[0] == 200  # the loop is not waiting on it
        assert until(lambda: srv.server.active == 0, 10)  # aborted, buffer freed
        assert reset_soon(stuck)  # not a kernel still flushing 64 MiB to it


def test_connections_are_capped_per_peer() -> None:
    with running({"/hello": hello}, Limits(per_peer=2)) as srv:
        first, second = srv.connect(), srv.connect()
        try:
            assert until(lambda: srv.server.active == 2, 10)
            assert srv.ask(b"GET /hello HTTP/1.1\r\n\r\n") == b""  # refused: closed at once
        finally:
            first.close()
            second.close()
        assert until(lambda: srv.server.active == 0, 10)
        assert srv.get("/hello")[0] == 200


def test_callers_at_the_same_time_share_one_run() -> None:
    calls: list[int] = []
    release = threading.Event()

    def work() -> int:
        calls.append(1)
        release.wait(10)
        return len(calls)

    pool = concurrent.futures.ThreadPoolExecutor(2)
    shared = Shared(work, pool)

    async def answer(request: Request) -> Response:
        return Response.text(200, f"{await shared()}\n")

    try:
        with running({"/work": answer}) as srv:
            with concurrent.futures.ThreadPoolExecutor(5) as clients:
                asked = [clients.submit(srv.get, "/work") for _ in range(5)]
                assert until(lambda: srv.server.active == 5, 10)
                release.set()
                assert [f.result(10) for f in asked] == [(200, b"1\n")] * 5
            assert srv.get("/work") == (200, b"2\n")  # a later caller runs it again
    finally:
        pool.shutdown()
