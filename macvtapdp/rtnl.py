"""A minimal rtnetlink (NETLINK_ROUTE) client on the standard library only.

Why not pyroute2: every resource runs in its own process, which must stay
under 45 MiB RSS, and ``import pyroute2`` alone costs +24 MiB and 0.3 s. We
need five link operations and link events; they fit in this module.

Message layout follows ``<linux/netlink.h>``, ``<linux/rtnetlink.h>`` and
``<linux/if_link.h>``; constant names are the kernel's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

# <linux/netlink.h>
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors do not echo our whole request back
NETLINK_EXT_ACK = 11  # errors carry the kernel's explanation (NLMSGERR_ATTR_MSG)
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO, NLM_F_DUMP_INTR = 0x1, 0x4, 0x8, 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR reply
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF
# <linux/rtnetlink.h>
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTMGRP_LINK = 0x1
RTEXT_FILTER_SKIP_STATS = 1 << 3
# <linux/if_link.h>
IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_TXQLEN = 3, 4, 5, 10, 13
IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_EXT_MASK, IFLA_LINK_NETNSID = 16, 18, 29, 37
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND = 1, 2, 4
IFLA_MACVLAN_MODE = 1
MACVLAN_MODE = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8}
# <linux/if.h>: interface flags and RFC 2863 operational states
IFF_UP, IFF_LOOPBACK = 0x1, 0x8
# What link health is read from: IFF_RUNNING is exactly operstate UP or UNKNOWN
IFF_RUNNING, IFF_LOWER_UP, IFF_DORMANT = 0x40, 0x10000, 0x20000
STATE_FLAGS = IFF_UP | IFF_RUNNING | IFF_LOWER_UP | IFF_DORMANT
IF_OPER_UNKNOWN, IF_OPER_NOTPRESENT, IF_OPER_DOWN, IF_OPER_LOWERLAYERDOWN = 0, 1, 2, 3
IF_OPER_TESTING, IF_OPER_DORMANT, IF_OPER_UP = 4, 5, 6
# <linux/if_arp.h>
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
_NLATTR = struct.Struct("=HH")  # len, type
_RECV_SIZE = 65536  # a dump skb is at most 32 KiB unless the kernel needs more
_RCVBUF = 1 << 20
_EVENT_RCVBUF = 4 << 20


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` is the positive error number."""

    def __init__(self, code: int, operation: str, detail: str = "") -> None:
        self.operation = operation
        self.message = f"{operation}: {os.strerror(code)}" + (f" ({detail})" if detail else "")
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return self.message


class EventsLost(NetlinkError):
    """The kernel dropped link events (ENOBUFS): re-read the state you follow."""

    def __init__(self) -> None:
        super().__init__(errno.ENOBUFS, "read link events", "events were dropped: resync")


@dataclass(frozen=True)
class Link:
    """One network interface as RTM_NEWLINK describes it."""

    index: int
    name: str
    flags: int = 0  # ifi_flags (IFF_*)
    operstate: int = IF_OPER_UNKNOWN
    kind: str | None = None  # IFLA_INFO_KIND: "veth", "macvtap", ...; None for physical
    lower_index: int | None = None  # IFLA_LINK when it is not the link itself
    link_netnsid: int | None = None  # set when the lower link lives in another netns
    txqlen: int | None = None
    mtu: int | None = None
    macvlan_mode: int | None = None  # a MACVLAN_MODE value, for macvlan/macvtap
    slave_kind: str | None = None  # IFLA_INFO_SLAVE_KIND: "bridge", "bond", ...
    master_index: int | None = None
    link_type: int = ARPHRD_ETHER  # ifi_type

    @property
    def admin_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def oper_ok(self) -> bool:
        """Operationally usable: UP, or UNKNOWN for drivers that do not report it."""
        return self.operstate in (IF_OPER_UP, IF_OPER_UNKNOWN)


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _text(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode("utf-8", "surrogateescape") + b"\0")


def _ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Decode a run of netlink attributes into {type: payload}."""
    found: dict[int, bytes] = {}
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + length]
        offset += _align(length)
    return found


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Split a datagram into (type, flags, seq, payload) messages."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        yield kind, flags, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def _int(attrs: dict[int, bytes], kind: int, fmt: str = "=I") -> int | None:
    value = attrs.get(kind)
    return struct.unpack_from(fmt, value)[0] if value and len(value) >= 4 else None


def _str(attrs: dict[int, bytes], kind: int) -> str | None:
    value = attrs.get(kind)
    return None if value is None else value.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_link(body: bytes) -> Link | None:
    """A Link from an RTM_NEWLINK/RTM_DELLINK payload; None for AF_BRIDGE port messages."""
    family, link_type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    if family != socket.AF_UNSPEC:
        return None
    attrs = _attrs(body, _IFINFOMSG.size)
    info = _attrs(attrs.get(IFLA_LINKINFO, b""))
    kind = _str(info, IFLA_INFO_KIND)
    data = _attrs(info.get(IFLA_INFO_DATA, b"")) if kind in ("macvlan", "macvtap") else {}
    lower = _int(attrs, IFLA_LINK)
    operstate = attrs.get(IFLA_OPERSTATE, b"\0")[0]
    return Link(
        index=index,
        name=_str(attrs, IFLA_IFNAME) or "",
        flags=flags,
        operstate=operstate,
        kind=kind,
        lower_index=lower if lower != index else None,
        link_netnsid=_int(attrs, IFLA_LINK_NETNSID, "=i"),
        txqlen=_int(attrs, IFLA_TXQLEN),
        mtu=_int(attrs, IFLA_MTU),
        macvlan_mode=_int(data, IFLA_MACVLAN_MODE),
        slave_kind=_str(info, IFLA_INFO_SLAVE_KIND),
        master_index=_int(attrs, IFLA_MASTER),
        link_type=link_type,
    )


def _extack(flags: int, body: bytes) -> str:
    """The kernel's error text (NETLINK_EXT_ACK), if the NLMSG_ERROR carries one."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    skip = _NLMSGHDR.size if flags & NLM_F_CAPPED else _NLMSGHDR.unpack_from(body, 4)[0]
    return _str(_attrs(body, 4 + _align(skip)), NLMSGERR_ATTR_MSG) or ""


def _open(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        try:  # SO_RCVBUFFORCE (33) ignores net.core.rmem_max but needs CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _receive(sock: socket.socket, operation: str) -> bytes:
    data, _, flags, _ = sock.recvmsg(_RECV_SIZE)
    if flags & socket.MSG_TRUNC:
        raise NetlinkError(errno.EMSGSIZE, operation, f"reply larger than {_RECV_SIZE} bytes")
    return data


class _Socket:
    """Owns one netlink socket: close() and use as a context manager."""

    _sock: socket.socket

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Rtnl(_Socket):
    """Request/response rtnetlink socket, in the network namespace of its creator.

    Thread-safe: each request holds a lock until its answer is complete.
    Every call returns or raises within ``timeout`` seconds (TimeoutError).
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._seq = 0
        self._sock = _open(_RCVBUF)
        self._sock.settimeout(timeout)

    def link(self, *, name: str | None = None, index: int | None = None) -> Link | None:
        """The link with this name or index, or None if there is none."""
        if (name is None) == (index is None):
            raise ValueError("give exactly one of name= or index=")
        body = _ifinfomsg(index or 0) + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        if name is not None:
            body += _text(IFLA_IFNAME, name)
        try:
            replies = self._request(f"get link {name or index}", RTM_GETLINK, 0, body)
        except NetlinkError as err:
            if err.errno == errno.ENODEV:
                return None
            raise
        return next((link for _, reply in replies if (link := _parse_link(reply))), None)

    def links(self) -> list[Link]:
        """Every link in the namespace (a dump, retried if links changed during it)."""
        body = _ifinfomsg() + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        for _attempt in range(3):
            replies = self._request("dump links", RTM_GETLINK, NLM_F_DUMP, body)
            if not any(flags & NLM_F_DUMP_INTR for flags, _ in replies):
                break
        return [link for _, reply in replies if (link := _parse_link(reply))]

    def add_macvtap(
        self, name: str, lower_index: int, mode: str, *, txqlen: int | None = None, up: bool = True
    ) -> Link:
        """Create macvtap ``name`` on link ``lower_index`` in one request; return it.

        The kernel echoes the new link (NLM_F_ECHO), which saves a lookup (0.09
        of ~1 ms); kernels that ignore the flag for links get it read back by
        name. The echo precedes the operstate update: ``operstate`` may be UNKNOWN.
        """
        if mode not in MACVLAN_MODE:
            raise ValueError(f"unknown macvtap mode {mode!r}")
        up_flag = IFF_UP if up else 0
        info = _nest(
            IFLA_LINKINFO,
            _text(IFLA_INFO_KIND, "macvtap"),
            _nest(IFLA_INFO_DATA, _u32(IFLA_MACVLAN_MODE, MACVLAN_MODE[mode])),
        )
        body = _ifinfomsg(0, up_flag, up_flag) + _text(IFLA_IFNAME, name)
        body += _u32(IFLA_LINK, lower_index)
        if txqlen is not None:
            body += _u32(IFLA_TXQLEN, txqlen)
        operation = f"create macvtap {name}"
        flags = NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK | NLM_F_ECHO
        echoed = self._request(operation, RTM_NEWLINK, flags, body + info)
        link = _parse_link(echoed[-1][1]) if echoed else self.link(name=name)
        if link is None:  # deleted by someone else in between
            raise NetlinkError(errno.ENODEV, operation, "gone right after creation")
        return link

    def set_up(self, index: int) -> None:
        body = _ifinfomsg(index, IFF_UP, IFF_UP)
        self._request(f"set link {index} up", RTM_NEWLINK, NLM_F_ACK, body)

    def delete(self, index: int) -> None:
        self._request(f"delete link {index}", RTM_DELLINK, NLM_F_ACK, _ifinfomsg(index))

    def _request(
        self, operation: str, kind: int, flags: int, body: bytes
    ) -> list[tuple[int, bytes]]:
        """Send one request; return the (flags, payload) of its answers."""
        with self._lock:
            self._seq = self._seq % 0xFFFFFFFF + 1
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST, self._seq, 0
            )
            try:
                self._sock.send(header + body)
                return self._answers(operation, flags)
            except TimeoutError:
                raise TimeoutError(
                    errno.ETIMEDOUT, f"{operation}: no answer within {self._timeout:g} s"
                ) from None
            except NetlinkError:
                raise
            except OSError as err:  # ENOBUFS: the kernel dropped our answer
                raise NetlinkError(err.errno or errno.EIO, operation) from err

    def _answers(self, operation: str, flags: int) -> list[tuple[int, bytes]]:
        """Read until the ACK (NLM_F_ACK), NLMSG_DONE (dumps) or the one reply (gets).

        Messages with another sequence number answer an earlier request
        that timed out: skipped.
        """
        answers: list[tuple[int, bytes]] = []
        while True:
            for rtype, rflags, seq, payload in _messages(_receive(self._sock, operation)):
                if seq != self._seq:
                    continue
                if rtype in (NLMSG_ERROR, NLMSG_DONE):
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code:
                        detail = _extack(rflags, payload) if rtype == NLMSG_ERROR else ""
                        raise NetlinkError(code, operation, detail)
                    return answers
                answers.append((rflags, payload))
                if not flags & (NLM_F_ACK | NLM_F_DUMP):
                    return answers


class LinkMonitor(_Socket):
    """Link events (RTMGRP_LINK) on a non-blocking socket, for select().

    Subscribed when constructed, so build it before reading the state to
    follow: no event after that read can be missed.
    """

    def __init__(self) -> None:
        self._sock = _open(_EVENT_RCVBUF)
        try:
            self._sock.bind((0, RTMGRP_LINK))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def only(self, name: str, index: int | None, flags: int | None = None) -> None:
        """Let the kernel pass only events of link ``index`` or of a link named ``name``.

        Every macvtap an Allocate makes, in any resource, is a burst of link
        events, and one event of its lower link; without a filter each
        resource's watcher would wake up and parse them all. A classic BPF
        socket filter drops them in the kernel. It reads the ifinfomsg's index
        and flags and the first attribute, which the kernel always makes
        IFLA_IFNAME (rtnl_fill_ifinfo). With ``flags``, events of ``index`` pass
        only if they delete or rename it or change its ``STATE_FLAGS``. Called
        again when the followed link changes; a link created with the name
        passes by name before that.
        """
        raw = name.encode()
        attr = raw + bytes(4 - len(raw) % 4)  # NUL-terminated; nla_put zeroes the padding
        head = struct.pack("=HH", 4 + len(raw) + 1, IFLA_IFNAME)
        words = [head] + [attr[i : i + 4] for i in range(0, len(attr), 4)]
        p = _BpfProgram()
        if index is not None:
            p.load(_IFI_INDEX)
            p.jump_unless(struct.pack("=i", index), "by name")
            if flags is None:
                p.jump("accept")
            p.load(_NLMSG_TYPE)
            p.mask(b"\xff\xff\0\0")
            p.jump_if(struct.pack("=HH", RTM_DELLINK, 0), "accept")
            p.load(_IFI_FLAGS)
            p.mask(struct.pack("=I", STATE_FLAGS))
            p.jump_unless(struct.pack("=I", (flags or 0) & STATE_FLAGS), "accept")
            for offset, word in enumerate(words):  # the same name: nothing changed
                p.load(_FIRST_NLA + 4 * offset)
                p.jump_unless(word, "accept")
            p.jump("reject")
        p.label("by name")
        for offset, word in enumerate(words):
            p.load(_FIRST_NLA + 4 * offset)
            p.jump_unless(word, "reject")
        p.jump("accept")
        p.attach(self._sock)

    def read(self) -> list[tuple[int, Link]]:
        """Every queued (RTM_NEWLINK | RTM_DELLINK, Link) event, without blocking.

        Raises EventsLost, after draining the queue, if the kernel dropped
        events (ENOBUFS) or one was truncated: the caller re-reads what it follows.
        """
        events: list[tuple[int, Link]] = []
        lost = False
        while True:
            try:
                data = _receive(self._sock, "read link events")
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno not in (errno.ENOBUFS, errno.EMSGSIZE):
                    raise
                lost = True
                continue
            for kind, _flags, _seq, body in _messages(data):
                if kind in (RTM_NEWLINK, RTM_DELLINK) and (link := _parse_link(body)):
                    events.append((kind, link))
        if lost:
            raise EventsLost()
        return events


# Offsets in a link event: nlmsghdr (16 bytes), then ifinfomsg (16: index at 4),
# then the attributes. Classic BPF loads are big-endian, so constants are the
# message's bytes read big-endian; a load past the end rejects the message.
_NLMSG_TYPE = 4
_IFI_INDEX = 16 + 4
_IFI_FLAGS = 16 + 8
_FIRST_NLA = 16 + 16
_SO_ATTACH_FILTER = 26


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _BpfProgram:
    """A classic BPF filter built from loads, masks and jumps to labels.

    Every program ends with the labels ``accept`` (the whole message) and
    ``reject``; ``jump_if``/``jump_unless`` compare the accumulator with a
    constant given as the message's bytes at the loaded offset.
    """

    _LD_W_ABS, _AND_K, _JA, _JEQ_K, _RET_K = 0x20, 0x54, 0x05, 0x15, 0x06

    def __init__(self) -> None:
        self._insns: list[tuple[int, str | None, str | None, int]] = []
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._insns.append((self._LD_W_ABS, None, None, offset))

    def mask(self, value: bytes) -> None:
        self._insns.append((self._AND_K, None, None, int.from_bytes(value, "big")))

    def jump_if(self, value: bytes, label: str) -> None:
        self._insns.append((self._JEQ_K, label, None, int.from_bytes(value, "big")))

    def jump_unless(self, value: bytes, label: str) -> None:
        self._insns.append((self._JEQ_K, None, label, int.from_bytes(value, "big")))

    def jump(self, label: str) -> None:
        self._insns.append((self._JA, label, None, 0))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def attach(self, sock: socket.socket) -> None:
        self.label("accept")
        self._insns.append((self._RET_K, None, None, 0xFFFFFFFF))
        self.label("reject")
        self._insns.append((self._RET_K, None, None, 0))
        code = []
        for i, (op, jt, jf, k) in enumerate(self._insns):
            skip = {name: self._labels[name] - i - 1 for name in (jt, jf) if name is not None}
            if op == self._JA:  # an unconditional jump takes its offset in k
                code.append(_SockFilter(op, 0, 0, skip[str(jt)]))
            else:
                code.append(_SockFilter(op, skip.get(str(jt), 0), skip.get(str(jf), 0), k))
        array = (_SockFilter * len(code))(*code)
        prog = _SockFprog(len(code), ctypes.cast(array, ctypes.POINTER(_SockFilter)))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(prog))
