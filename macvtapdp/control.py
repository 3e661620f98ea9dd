"""Talk to the running supervisord over its unix control socket (XML-RPC)."""

from __future__ import annotations

import xmlrpc.client
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

from macvtapdp.supervisord import Layout


class Unreachable(Exception):
    """supervisord does not answer on the control socket."""


def connect(layout: Layout) -> Any:
    """The ``supervisor`` namespace of supervisord's XML-RPC interface."""
    transport = SupervisorTransport(None, None, layout.server_url)
    # the host part is ignored: the transport always uses the unix socket
    return xmlrpc.client.ServerProxy("http://localhost", transport=transport).supervisor


def processes(layout: Layout) -> list[dict[str, Any]]:
    """``getAllProcessInfo()``: one dict per program (name, statename, pid, start, now...)."""
    try:
        return cast(list[dict[str, Any]], connect(layout).getAllProcessInfo())
    except (OSError, xmlrpc.client.Error) as err:
        raise Unreachable(f"cannot reach supervisord at {layout.server_url}: {err}") from err
