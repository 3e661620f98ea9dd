"""Talk to the running supervisord over its unix control socket (XML-RPC).

One call is one HTTP/1.0 request on a fresh connection with a timeout: a
stopped or wedged supervisord never hangs a caller (``status``, the watchdog,
the reconciler), and a half-read answer is never reused. Every failure becomes
ours: ``Unreachable`` (no answer in time, or not one we understand) or
``Refused`` (a fault, with its code).

The request is written and the answer parsed here, with the standard library's
``socket`` and ``expat`` only: ``macvtapdp status`` runs on every probe, and
``xmlrpc.client`` (with ``http.client`` and ``email``) or supervisor's own
transport cost it 30-40 ms of CPU and 5 MiB per call. What supervisord's
``supervisor`` namespace sends is all there is to parse: structs, arrays,
strings, ints, booleans, doubles and faults.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol, Self, cast

from macvtapdp.errors import Refused, Unreachable

TIMEOUT = 5.0
MAX_ANSWER = 16 * 1024 * 1024  # getAllProcessInfo of 64 resources is ~40 KiB
# supervisor.xmlrpc.Faults
BAD_NAME, NOT_RUNNING, ALREADY_ADDED = 10, 70, 90


class Control(Protocol):
    """What the reconciler and the watchdog need of supervisord (``Supervisor``, or a fake)."""

    def call(self, method: str, *args: Any) -> Any: ...

    def processes(self) -> list[dict[str, Any]]: ...


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _param(value: object) -> str:
    if isinstance(value, bool):
        return f"<boolean>{int(value)}</boolean>"
    if isinstance(value, int):
        return f"<int>{value}</int>"
    if isinstance(value, str):
        return f"<string>{_escape(value)}</string>"
    raise TypeError(f"cannot send {type(value).__name__} to supervisord")


def request(method: str, args: tuple[object, ...]) -> bytes:
    """The HTTP request of one XML-RPC call."""
    params = "".join(f"<param><value>{_param(a)}</value></param>" for a in args)
    body = (
        f"<?xml version='1.0'?><methodCall><methodName>supervisor.{_escape(method)}"
        f"</methodName><params>{params}</params></methodCall>"
    ).encode()
    head = (
        "POST /RPC2 HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class _Fault(Exception):
    def __init__(self, code: int, text: str) -> None:
        self.code, self.text = code, text


_SCALARS: dict[str, Any] = {
    "string": str,
    "int": int,
    "i4": int,
    "i8": int,
    "boolean": lambda t: t.strip() == "1",
    "double": float,
    "nil": lambda _t: None,
}


def parse(body: bytes) -> Any:
    """The value of a methodResponse; ``_Fault`` for a fault; ValueError if malformed."""
    from xml.parsers import expat

    containers: list[list[Any] | _Struct] = []  # the open arrays and structs
    typed: list[bool] = []  # per open <value>: whether it holds a typed element
    text: list[str] = []
    top: list[Any] = []
    fault = False

    def put(value: Any) -> None:
        if not containers:
            top.append(value)
        elif isinstance(containers[-1], _Struct):
            containers[-1].value[containers[-1].name] = value
        else:
            containers[-1].append(value)

    def start(tag: str, _attrs: dict[str, str]) -> None:
        nonlocal fault
        text.clear()
        if tag == "value":
            typed.append(False)
            return
        if typed:
            typed[-1] = True
        if tag == "array":
            containers.append([])
        elif tag == "struct":
            containers.append(_Struct())
        elif tag == "fault":
            fault = True

    def end(tag: str) -> None:
        value = "".join(text)
        text.clear()
        if tag == "value":
            if not typed.pop():
                put(value)  # <value>text</value> without a type is a string
        elif tag in _SCALARS:
            put(_SCALARS[tag](value))
        elif tag == "name" and containers and isinstance(containers[-1], _Struct):
            containers[-1].name = value
        elif tag in ("array", "struct"):
            done = containers.pop()
            put(done.value if isinstance(done, _Struct) else done)

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(body, True)
    except expat.ExpatError as err:
        raise ValueError(f"malformed XML-RPC answer: {err}") from None
    if len(top) != 1:
        raise ValueError(f"expected one value in the answer, found {len(top)}")
    if fault:
        info = top[0] if isinstance(top[0], dict) else {}
        raise _Fault(int(info.get("faultCode", 0)), str(info.get("faultString", "")))
    return top[0]


class _Struct:
    __slots__ = ("name", "value")

    def __init__(self) -> None:
        self.value: dict[str, Any] = {}
        self.name = ""


def _exchange(path: str, data: bytes, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        chunks: list[bytes] = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ValueError(f"answer larger than {MAX_ANSWER} bytes")
    return b"".join(chunks)


def _body(answer: bytes) -> bytes:
    head, sep, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(None, 2)
    if not sep or len(status) < 2 or not status[0].startswith(b"HTTP/"):
        raise ValueError("not an HTTP answer")
    if status[1] != b"200":
        raise ValueError(f"HTTP {b' '.join(status[1:]).decode(errors='replace')}")
    return body


class Supervisor:
    """supervisord's ``supervisor`` XML-RPC namespace; ``call`` maps errors to ours."""

    def __init__(self, server_url: str, timeout: float = TIMEOUT) -> None:
        self.server_url = server_url
        self.path = server_url.removeprefix("unix://")
        self.timeout = timeout

    def call(self, method: str, *args: Any) -> Any:
        try:
            return parse(_body(_exchange(self.path, request(method, args), self.timeout)))
        except _Fault as fault:
            raise Refused(fault.code, f"supervisord refused {method}: {fault.text}") from None
        except (OSError, ValueError) as err:
            raise Unreachable(f"cannot reach supervisord at {self.server_url}: {err}") from err

    def processes(self) -> list[dict[str, Any]]:
        """``getAllProcessInfo()``: one dict per program (name, statename, pid, start, now...)."""
        return cast(list[dict[str, Any]], self.call("getAllProcessInfo"))

    def close(self) -> None:
        """Nothing to close: every call has its own connection."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
