"""``status`` as the probes run it: its lean pieces against the real libraries they replace.

The probes' command lines skip typer, grpc and ``xmlrpc.client`` (bench/probes.py has
the cost); each replacement is checked here against the real thing: the XML-RPC
answers ``xmlrpc.client`` writes, a real grpc server's answers and errors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from macvtapdp import rundir
from macvtapdp.api.v1beta1 import api_pb2
from macvtapdp.errors import Refused, Unreachable
from macvtapdp.node import control, grpcping, status

HEAVY = ("typer", "click", "grpc", "xmlrpc", "http", "supervisor", "pydantic", "dataclasses")


@pytest.mark.parametrize("args", [["--alive"], []], ids=["liveness", "readiness"])
def test_the_probes_command_lines_load_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    code = (
        "import sys; from macvtapdp.__main__ import main\n"
        f"sys.argv = ['macvtapdp', 'status', *{args!r}, '--run-dir={tmp_path}']\n"
        "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(code, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.split(None, 1) == ["4", "[]\n"], done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], None, (rundir.DEFAULT_RUN_DIR, False)),
        (["--alive"], None, (rundir.DEFAULT_RUN_DIR, True)),
        (["--run-dir", "/x", "--alive"], None, ("/x", True)),
        (["--run-dir=/x"], "/env", ("/x", False)),
        ([], "/env", ("/env", False)),
        ([], "", (rundir.DEFAULT_RUN_DIR, False)),  # as click: an empty variable is unset
    ],
)
def test_the_probes_arguments_mean_what_the_cli_says(
    argv: list[str],
    env: str | None,
    expected: tuple[str, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, bool]] = []
    monkeypatch.setattr(status, "report", lambda run_dir, alive: asked.append((run_dir, alive)))
    if env is None:
        monkeypatch.delenv(rundir.RUN_DIR_VAR, raising=False)
    else:
        monkeypatch.setenv(rundir.RUN_DIR_VAR, env)
    status.main(argv)
    assert asked == [expected]


@pytest.mark.parametrize(
    "argv", [["--help"], ["-h"], ["--run-dir"], ["--run-dir="], ["--bogus"], ["x"], ["--alive=1"]]
)
def test_anything_else_goes_to_the_typer_cli(argv: list[str]) -> None:
    assert status.main(argv) is None


def test_status_help_still_comes_from_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "macvtapdp", "status", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "--alive" in done.stdout and "--run-dir" in done.stdout


ANSWERS: list[Any] = [
    [{"name": "resource-a<b>&", "pid": 5, "ok": True, "x": 1.5, "l": ["a", 2, [], {}], "e": ""}],
    [[["resource-x", "resource-y"], [], ["resource-z"]]],
    "plain",
    0,
    False,
    True,
]


@pytest.mark.parametrize("value", ANSWERS)
def test_xmlrpc_answers_read_as_xmlrpc_client_reads_them(value: Any) -> None:
    body = xmlrpc.client.dumps((value,), methodresponse=True).encode()
    assert control.parse(body) == value


def test_an_untyped_value_is_a_string() -> None:
    body = (
        b"<methodResponse><params><param><value>RUNNING</value></param></params></methodResponse>"
    )
    assert control.parse(body) == "RUNNING"


@pytest.mark.parametrize("args", [(), ("resource-a&<b>", False), ("x", True, 7)])
def test_requests_read_as_xmlrpc_client_reads_them(args: tuple[object, ...]) -> None:
    head, body = control.request("stopProcessGroup", args).split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /RPC2 HTTP/1.0\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert xmlrpc.client.loads(body) == (args, "supervisor.stopProcessGroup")


def serve_once(path: str, answer: bytes) -> threading.Thread:
    """A unix socket at ``path`` that answers one connection with ``answer`` and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def http(body: bytes, status_line: bytes = b"HTTP/1.0 200 OK") -> bytes:
    return status_line + b"\r\nContent-Type: text/xml\r\n\r\n" + body


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
def test_a_grpc_server_that_answers_is_serving(plugin_socket: str) -> None:
    assert grpcping.answers(plugin_socket, 2.0)
    assert all(grpcping.answers(plugin_socket, 2.0) for _ in range(5))  # and again


@pytest.mark.parametrize("plugin_socket", [True], indirect=True)
def test_a_grpc_error_is_not_serving(plugin_socket: str) -> None:
    assert not grpcping.answers(plugin_socket, 2.0)


@pytest.mark.parametrize("plugin_socket", [False], indirect=True)
def test_an_unknown_method_is_not_serving(plugin_socket: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(plugin_socket)
        sock.sendall(grpcping.request("/v1beta1.DevicePlugin/NoSuchMethod"))
        assert not grpcping._follow(sock, grpcping._Reader(sock, time.monotonic() + 2.0))


def test_no_server_or_a_silent_one_is_not_serving(tmp_path: Path) -> None:
    path = str(tmp_path / "dp.sock")
    assert not grpcping.answers(path, 0.5)  # nothing there
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        assert not grpcping.answers(path, 0.2)  # accepts, never answers
    os.unlink(path)
