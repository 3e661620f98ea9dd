"""Link events (RTMGRP_LINK) from pyroute2, for callers that select() on a descriptor.

pyroute2's event socket is read by an asyncio protocol that may pull several
datagrams into its own queue at once, so select() on its socket misses events
(tried: 5 of 11 seen). So a ``LinkEvents`` reads them in a thread of its own
(with its own loop and socket: pyroute2's threading rule) into a queue, and
makes a pipe readable whenever the queue is not empty: ``fileno()`` is that
pipe. Subscribed when constructed, so build it before reading the state to
follow: no event after that read can be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import socket
from typing import Any, Self

from macvtapdp.errors import EventsLost, KernelError
from macvtapdp.linux import bpf
from macvtapdp.linux.link import Link
from macvtapdp.linux.netlink import AsyncIPRoute, LoopThread, kernel_error, parse

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
NEWLINK, DELLINK = "RTM_NEWLINK", "RTM_DELLINK"
_RCVBUF = 4 << 20
MAX_QUEUED = 10_000  # a consumer this far behind re-reads what it follows instead
_LOST = object()


class LinkEvents:
    """Every RTM_NEWLINK and RTM_DELLINK of this network namespace, queued."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Link] | object] = queue.Queue(MAX_QUEUED)
        self._overflow = False
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._owner = LoopThread("linkevents")
        self._ipr: Any = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Future[None] | None = None
        try:
            self._owner.call(self._subscribe())
        except BaseException as err:
            self.close()
            if isinstance(err, OSError | KernelError):
                raise kernel_error(err, "subscribe to link events") from err
            raise

    async def _subscribe(self) -> None:
        self._ipr = AsyncIPRoute()
        await self._ipr.bind(groups=RTMGRP_LINK)
        self._sock = self._ipr.socket
        assert self._sock is not None
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        while True:
            try:
                async for msg in self._ipr.get():
                    event = msg.get("event")
                    if msg.get("family") not in (None, 0):
                        continue  # AF_BRIDGE port messages: a port leaving is no deletion
                    if event in (NEWLINK, DELLINK) and (link := parse(msg)) is not None:
                        self._put((event, link))
            except asyncio.CancelledError:
                raise
            except OSError as err:
                if err.errno in (errno.ENOBUFS, errno.EMSGSIZE):
                    self._put(_LOST)
                    continue
                log.error("reading link events failed: %r", err)
                self._put(err)
                return
            except Exception as err:  # a message pyroute2 cannot decode: resync
                log.warning("could not decode a link event (%r): re-reading", err)
                self._put(_LOST)

    def _put(self, item: object) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._overflow = True  # as the kernel's ENOBUFS: the consumer must resync
        with contextlib.suppress(BlockingIOError):  # already readable
            os.write(self._w, b"\0")

    def fileno(self) -> int:
        """Readable while events are queued."""
        return self._r

    def read(self) -> list[tuple[str, Link]]:
        """Every queued (NEWLINK | DELLINK, Link) event, without blocking.

        Raises EventsLost, after draining the queue, if the kernel dropped
        events (ENOBUFS): the caller re-reads what it follows. Raises
        KernelError if the subscription itself broke: make a new one.
        """
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        events: list[tuple[str, Link]] = []
        lost, self._overflow = self._overflow, False
        broken: BaseException | None = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _LOST:
                lost = True
            elif isinstance(item, BaseException):
                broken = item
            else:
                events.append(item)  # type: ignore[arg-type]
        if broken is not None:
            raise kernel_error(broken, "read link events") from broken
        if lost:
            raise EventsLost()
        return events

    def only(
        self,
        name: str,
        index: int | None,
        state: tuple[int, int | None, int] | None = None,
        *,
        flags_mask: int,
        high_deletions: bool = False,
    ) -> None:
        """Have the kernel pass only events of this link (``bpf.follow_link``)."""
        if self._sock is not None:
            bpf.follow_link(
                self._sock,
                name,
                index,
                state,
                flags_mask=flags_mask,
                high_deletions=high_deletions,
            )

    def close(self) -> None:
        async def stop() -> None:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            if self._ipr is not None:
                self._ipr.close()

        with contextlib.suppress(Exception):
            self._owner.call(stop(), 2.0)
        self._owner.stop()
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
