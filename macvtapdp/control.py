"""Talk to the running supervisord over its unix control socket (XML-RPC)."""

from __future__ import annotations

import contextlib
import xmlrpc.client
from collections.abc import Iterator
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

from macvtapdp.supervisord import Layout


class Unreachable(Exception):
    """supervisord does not answer on the control socket."""


@contextlib.contextmanager
def connect(server_url: str) -> Iterator[Any]:
    """supervisord's XML-RPC ``supervisor`` namespace at ``unix://...``; closed afterwards."""
    transport = SupervisorTransport(None, None, server_url)
    # the host part is ignored: the transport always uses the unix socket
    with xmlrpc.client.ServerProxy("http://localhost", transport=transport) as proxy:
        yield proxy.supervisor


def processes(layout: Layout) -> list[dict[str, Any]]:
    """``getAllProcessInfo()``: one dict per program (name, statename, pid, start, now...)."""
    try:
        with connect(layout.server_url) as supervisor:
            return cast(list[dict[str, Any]], supervisor.getAllProcessInfo())
    except (OSError, xmlrpc.client.Error) as err:
        raise Unreachable(f"cannot reach supervisord at {layout.server_url}: {err}") from err
