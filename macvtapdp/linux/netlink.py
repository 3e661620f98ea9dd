"""Links and macvtaps through pyroute2, every request made by one owner thread.

pyroute2 0.9 keeps its sockets and event loop per thread: a client used from
gRPC's worker threads would open a socket in each (its threading docs say to
use one socket per thread, or one owner thread). So a ``Netlink`` runs one
asyncio loop in a thread of its own, holding one ``AsyncIPRoute``; the
blocking methods below hand their request to that loop and wait for the
answer. Callers see small frozen ``Link`` records and ``KernelError``, never
pyroute2's message objects or exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Self, TypeVar

from macvtapdp.errors import KernelError
from macvtapdp.linux import pyroute2_lean
from macvtapdp.linux.link import Link

AsyncIPRoute, Pyroute2Error = pyroute2_lean.rtnl()
IfInfMsg = pyroute2_lean.ifinfmsg()

T = TypeVar("T")

RTM_GETLINK, NLM_F_REQUEST, NLM_F_DUMP = 18, 0x1, 0x300  # <linux/rtnetlink.h>, <linux/netlink.h>
REQUEST_TIMEOUT = 5.0


def parse(msg: Any) -> Link | None:
    """A ``Link`` from one pyroute2 ifinfmsg; None if it names no interface."""
    name = msg.get("IFLA_IFNAME")
    if not name:
        return None
    kind = slave_kind = mode = None
    info = msg.get("IFLA_LINKINFO")
    if info is not None:
        kind = info.get("IFLA_INFO_KIND")
        slave_kind = info.get("IFLA_INFO_SLAVE_KIND")
        data = info.get("IFLA_INFO_DATA")
        if kind in ("macvtap", "macvlan") and data is not None and hasattr(data, "get"):
            mode = data.get("IFLA_MACVTAP_MODE") or data.get("IFLA_MACVLAN_MODE")
    index = int(msg["index"])
    lower = msg.get("IFLA_LINK")
    props = msg.get("IFLA_PROP_LIST")
    altnames = tuple(props.get_attrs("IFLA_ALT_IFNAME")) if props is not None else ()
    return Link(
        index=index,
        name=str(name),
        flags=int(msg["flags"]),
        operstate=str(msg.get("IFLA_OPERSTATE") or "UNKNOWN"),
        kind=kind,
        lower_index=lower if lower and lower != index else None,
        link_netnsid=msg.get("IFLA_LINK_NETNSID"),
        txqlen=msg.get("IFLA_TXQLEN"),
        mtu=msg.get("IFLA_MTU"),
        macvlan_mode=str(mode) if mode else None,
        slave_kind=slave_kind,
        master_index=msg.get("IFLA_MASTER") or None,
        link_type=int(msg["ifi_type"]),
        altnames=altnames,
        new_netnsid=msg.get("IFLA_NEW_NETNSID"),
        new_index=msg.get("IFLA_NEW_IFINDEX"),
        size=int(msg["header"].get("length") or 0),
    )


def kernel_error(err: BaseException, operation: str) -> KernelError:
    """pyroute2's (or the OS's) error as ours, with its errno."""
    code = getattr(err, "code", None) or getattr(err, "errno", None) or errno.EIO
    detail = ""
    if len(err.args) > 1 and err.args[1] and str(err.args[1]) != os.strerror(code):
        detail = str(err.args[1])
    return KernelError(int(code), operation, detail)


class LoopThread:
    """An asyncio loop running in a daemon thread of its own; ``call`` runs a coroutine there."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = REQUEST_TIMEOUT) -> T:
        """Run ``coro`` on the loop and wait for its result (not from the loop's own thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self.loop.close()


class Netlink:
    """Blocking rtnetlink requests, all made from one owner thread (see the module doc)."""

    def __init__(self, timeout: float = REQUEST_TIMEOUT) -> None:
        self._timeout = timeout
        self._owner = LoopThread("netlink")
        self._ipr: Any = None
        self._serial = asyncio.Lock()
        try:
            self._ipr = self._owner.call(self._open())
        except BaseException:
            self._owner.stop()
            raise

    @staticmethod
    async def _open() -> Any:
        ipr = AsyncIPRoute()
        await ipr.setup_endpoint()
        return ipr

    def _request(self, operation: str, make: Callable[[Any], Awaitable[T]]) -> T:
        async def run() -> T:
            async with self._serial:  # one request at a time: a dump cannot share the socket
                return await make(self._ipr)

        if self._ipr is None:
            raise KernelError(errno.ESHUTDOWN, operation, "the netlink client is closed")
        try:
            return self._owner.call(run(), self._timeout)
        except RuntimeError as err:  # the loop closed while we asked
            raise KernelError(errno.ESHUTDOWN, operation, "the netlink client is closed") from err
        except Pyroute2Error as err:
            raise kernel_error(err, operation) from err
        except FutureTimeout as err:
            raise KernelError(errno.ETIMEDOUT, operation, "no answer from the kernel") from err
        except OSError as err:
            raise kernel_error(err, operation) from err

    def link(self, *, name: str | None = None, index: int | None = None) -> Link | None:
        """The link called ``name`` (or one of its altnames) or numbered ``index``; None if none."""
        query: dict[str, Any] = {"index": index} if index is not None else {"ifname": name}

        async def get(ipr: Any) -> Link | None:
            try:
                found = await ipr.link("get", **query)
            except Pyroute2Error as err:
                if getattr(err, "code", None) in (errno.ENODEV, errno.ENOENT):
                    return None
                raise
            return parse(found[0]) if found else None

        return self._request(f"look up link {name if index is None else index}", get)

    def links(self) -> list[Link]:
        """Every link of this network namespace."""

        async def dump(ipr: Any) -> list[Link]:
            return [link async for msg in await ipr.link("dump") if (link := parse(msg))]

        return self._request("list links", dump)

    def macvtaps(self) -> list[Link]:
        """Every macvtap of this network namespace.

        The kernel filters the dump by kind (``ip link show type macvtap``), so a
        node's hundreds of pod veths are not parsed while every other request
        waits (the README, "Sweep", has the figure). A kernel that ignores the
        filter sends every link; the kind is checked here as well.
        """

        async def dump(ipr: Any) -> list[Link]:
            msg = IfInfMsg()
            msg["attrs"] = [("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "macvtap")]})]
            answer = await ipr.nlm_request(msg, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
            return [link async for m in answer if (link := parse(m)) and link.kind == "macvtap"]

        return self._request("list macvtaps", dump)

    def add_macvtap(
        self,
        ifname: str,
        lower_index: int,
        mode: str,
        *,
        index: int | None = None,
        txqlen: int | None = None,
        altname: str | None = None,
    ) -> None:
        """Create macvtap ``ifname`` on ``lower_index``, up, with ifindex ``index`` if given.

        With ``altname`` the alternative name is added right after (the kernel
        takes altnames only through RTM_NEWLINKPROP); if that fails, the new
        macvtap is deleted again and the error raised.
        """
        spec: dict[str, Any] = {
            "ifname": ifname,
            "kind": "macvtap",
            "link": lower_index,
            "macvtap_mode": mode,
            "state": "up",
        }
        if index is not None:
            spec["index"] = index
        if txqlen is not None:
            spec["txqlen"] = txqlen

        async def add(ipr: Any) -> None:
            await ipr.link("add", **spec)
            if altname is None:
                return
            try:
                await ipr.link("property_add", ifname=ifname, altname=altname)
            except BaseException:
                with contextlib.suppress(Pyroute2Error):
                    await ipr.link("del", ifname=ifname)
                raise

        self._request(f"create macvtap {ifname}", add)

    def add_altname(self, index: int, altname: str) -> None:
        """Give link ``index`` the alternative name ``altname``."""

        async def add(ipr: Any) -> None:
            await ipr.link("property_add", index=index, altname=altname)

        self._request(f"add altname {altname} to link {index}", add)

    def set_up(self, index: int) -> None:
        async def up(ipr: Any) -> None:
            await ipr.link("set", index=index, state="up")

        self._request(f"set link {index} up", up)

    def delete(self, index: int) -> None:
        async def delete(ipr: Any) -> None:
            await ipr.link("del", index=index)

        self._request(f"delete link {index}", delete)

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            with contextlib.suppress(Exception):  # closing must not fail the caller
                self._owner.call(_close(ipr))
        self._owner.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _close(ipr: Any) -> None:
    ipr.close()
