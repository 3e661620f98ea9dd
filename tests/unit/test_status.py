"""``status``'s two clients: supervisord's XML-RPC with a timeout, and the plugin-socket probe.

Each is checked against real peers: XML-RPC answers as ``xmlrpc.client`` writes them, a
socket that never answers, and a real grpc server answering or failing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import xmlrpc.client
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from macvtapdp.api.v1beta1 import api_pb2
from macvtapdp.errors import Refused, Unreachable
from macvtapdp.node import control, status


def serve_once(path: str, answer: bytes) -> threading.Thread:
    """A unix socket at ``path`` that answers one connection with ``answer`` and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            read_request(conn)
            conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_request(conn: socket.socket) -> None:
    """Read one whole HTTP request: head and body may come in separate writes, and
    closing before the body came would fail the client's write (EPIPE), not its read."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length and (chunk := conn.recv(65536)):
        body += chunk


def http(body: bytes, status_line: bytes = b"HTTP/1.0 200 OK") -> bytes:
    head = f"\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return status_line + head + body


def test_an_answer_is_read_back(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    answer = [{"name": "resource-a", "group": "resource-a", "statename": "RUNNING", "pid": 5}]
    serve_once(path, http(xmlrpc.client.dumps((answer,), methodresponse=True).encode()))
    with control.Supervisor(f"unix://{path}") as supervisor:
        assert supervisor.processes() == answer


def test_a_fault_is_refused_with_its_code(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    fault = xmlrpc.client.dumps(
        xmlrpc.client.Fault(10, "BAD_NAME: resource-x"), methodresponse=True
    )
    serve_once(path, http(fault.encode()))
    with pytest.raises(Refused) as caught:
        control.Supervisor(f"unix://{path}").call("stopProcessGroup", "resource-x")
    assert caught.value.code == control.BAD_NAME
    assert "BAD_NAME: resource-x" in str(caught.value)


@pytest.mark.parametrize(
    "answer",
    [b"", b"garbage", http(b"<methodResponse>"), http(b"", b"HTTP/1.0 401 Unauthorized")],
    ids=["closed", "not-http", "bad-xml", "401"],
)
def test_anything_but_an_answer_is_unreachable(answer: bytes, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    serve_once(path, answer)
    with pytest.raises(Unreachable):
        control.Supervisor(f"unix://{path}").call("getState")


def test_a_silent_supervisord_is_unreachable_within_the_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        with pytest.raises(Unreachable):
            control.Supervisor(f"unix://{path}", timeout=0.2).call("getState")


def test_status_of_a_silent_supervisord_exits_4(tmp_path: Path) -> None:
    """A stopped supervisord (SIGSTOP) accepts connections and never answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "supervisor.sock"))
        listener.listen(8)
        for args in (["--alive"], []):
            done = subprocess.run(
                [sys.executable, "-m", "macvtapdp", "status", f"--run-dir={tmp_path}", *args],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 4, done
            assert done.stderr.startswith("macvtapdp: error: cannot reach supervisord")


def options_handler(fail: bool) -> grpc.GenericRpcHandler:
    """GetDevicePluginOptions as a device plugin serves it, or failing."""

    def options(request: api_pb2.Empty, context: grpc.ServicerContext) -> Any:
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return api_pb2.DevicePluginOptions(pre_start_required=True)

    handler = grpc.unary_unary_rpc_method_handler(
        options,
        request_deserializer=api_pb2.Empty.FromString,
        response_serializer=api_pb2.DevicePluginOptions.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        "v1beta1.DevicePlugin", {"GetDevicePluginOptions": handler}
    )


@pytest.fixture
def plugin_socket(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    path = str(tmp_path / "dp.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((options_handler(request.param),))
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield path
    finally:
        server.stop(None)


@pytest.mark.parametrize("plugin_socket", [False], indirect=True)
def test_a_plugin_that_answers_is_serving(plugin_socket: str) -> None:
    assert status.probe(plugin_socket)


@pytest.mark.parametrize("plugin_socket", [True], indirect=True)
def test_a_plugin_that_fails_is_not_serving(plugin_socket: str) -> None:
    assert not status.probe(plugin_socket)


def test_no_server_or_a_silent_one_is_not_serving(tmp_path: Path) -> None:
    path = str(tmp_path / "dp.sock")
    assert not status.probe(path, 0.5)  # nothing there
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        assert not status.probe(path, 0.3)  # accepts, never answers
    os.unlink(path)
