"""Talk to the running supervisord over its unix control socket (XML-RPC).

supervisor's own ``SupervisorTransport`` does the HTTP over a unix socket;
its connection has no timeout, and a stopped supervisord would hang every
caller (``status``, the watchdog, the reconciler) for good. So the connection
here is supervisor's with a socket timeout, and every failure becomes ours:
``Unreachable`` (no answer in time) or ``Refused`` (a fault, with its code).
"""

from __future__ import annotations

import socket
import xmlrpc.client
from http.client import HTTPException
from typing import Any, Protocol, Self, cast
from xml.parsers.expat import ExpatError

from supervisor.xmlrpc import SupervisorTransport, UnixStreamHTTPConnection

from macvtapdp.errors import Refused, Unreachable

TIMEOUT = 5.0
# supervisor.xmlrpc.Faults
BAD_NAME, NOT_RUNNING, ALREADY_ADDED = 10, 70, 90


class Control(Protocol):
    """What the reconciler and the watchdog need of supervisord (``Supervisor``, or a fake)."""

    def call(self, method: str, *args: Any) -> Any: ...

    def processes(self) -> list[dict[str, Any]]: ...


class _Connection(UnixStreamHTTPConnection):  # type: ignore[misc]
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)


class _Transport(SupervisorTransport):  # type: ignore[misc]
    def __init__(self, server_url: str, timeout: float) -> None:
        super().__init__(None, None, server_url)
        path = server_url.removeprefix("unix://")

        def connection() -> _Connection:
            conn = _Connection("localhost", timeout=timeout)
            conn.socketfile = path
            return conn

        self._get_connection = connection


class Supervisor:
    """supervisord's ``supervisor`` XML-RPC namespace; ``call`` maps errors to ours."""

    def __init__(self, server_url: str, timeout: float = TIMEOUT) -> None:
        self.server_url = server_url
        self._transport = _Transport(server_url, timeout)
        # the host part is ignored: the transport always uses the unix socket
        self._proxy = xmlrpc.client.ServerProxy("http://localhost", transport=self._transport)

    def call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            message = f"supervisord refused {method}: {fault.faultString}"
            raise Refused(fault.faultCode, message) from fault
        except (OSError, xmlrpc.client.Error, HTTPException, ExpatError, ValueError) as err:
            self._transport.close()  # a half-read answer must not be reused
            raise Unreachable(f"cannot reach supervisord at {self.server_url}: {err}") from err

    def processes(self) -> list[dict[str, Any]]:
        """``getAllProcessInfo()``: one dict per program (name, statename, pid, start, now...)."""
        return cast(list[dict[str, Any]], self.call("getAllProcessInfo"))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
