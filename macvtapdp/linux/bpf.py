"""Classic BPF socket filters for link events: drop in the kernel what nobody follows.

Every macvtap an Allocate makes, in any resource, is a burst of link events;
every veth a container runtime makes is another. Without a filter every
resource's watcher would wake up and have pyroute2 parse each of them (the
README has the measured cost). A filter reads the raw message: the netlink
header, the ifinfomsg (index and flags at fixed offsets) and the first two
attributes, which ``rtnl_fill_ifinfo`` always writes as IFLA_IFNAME then
IFLA_TXQLEN. Neither pyroute2 nor the standard library builds BPF programs, so
this is the small assembler it takes (SO_ATTACH_FILTER, ``<linux/filter.h>``).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys

RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME, IFLA_TXQLEN = 3, 13
# Offsets in a link event: nlmsghdr (16 bytes: type at 4), then ifinfomsg (16:
# index at 4, flags at 8), then the attributes. Classic BPF loads are
# big-endian, so constants are the message's bytes read big-endian; a load past
# the end of the message rejects it.
_NLMSG_TYPE = 4
_IFI_INDEX = 16 + 4
_IFI_FLAGS = 16 + 8
_FIRST_NLA = 16 + 16
_SO_ATTACH_FILTER = 26
_TOP_BYTE = 3 if sys.byteorder == "little" else 0
HIGH_INDEX = 1 << 30


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class Program:
    """A classic BPF filter built from loads, masks and jumps to labels.

    Every program ends with the labels ``accept`` (the whole message) and
    ``reject``; ``jump_if``/``jump_unless`` compare the accumulator with a
    constant given as the message's bytes at the loaded offset.
    """

    _LD_W_ABS, _LD_B_ABS, _AND_K, _JA, _JEQ_K, _JSET_K, _RET_K = (
        0x20,
        0x30,
        0x54,
        0x05,
        0x15,
        0x45,
        0x06,
    )

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

    def load_byte(self, offset: int) -> None:
        self._insns.append((self._LD_B_ABS, None, None, offset))

    def jump_if_any(self, bits: int, label: str) -> None:
        """Jump if the accumulator has any of ``bits`` set."""
        self._insns.append((self._JSET_K, label, None, bits))

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


def _name_words(name: str) -> list[bytes]:
    """IFLA_IFNAME of ``name`` as the 4-byte words the kernel writes (NUL, zero padding)."""
    raw = name.encode()
    attr = raw + bytes(4 - len(raw) % 4)
    head = struct.pack("=HH", 4 + len(raw) + 1, IFLA_IFNAME)
    return [head] + [attr[i : i + 4] for i in range(0, len(attr), 4)]


def follow_link(
    sock: socket.socket,
    name: str,
    index: int | None,
    state: tuple[int, int | None, int] | None = None,
    *,
    flags_mask: int = 0x1 | 0x40 | 0x10000 | 0x20000,
    high_deletions: bool = False,
) -> None:
    """Pass only events of link ``index`` or of a link named ``name``.

    With ``state`` = (flags, txqlen, message length), events of ``index``
    pass only if they delete or rename the link, change its flags in
    ``flags_mask`` (default: IFF_UP, IFF_RUNNING, IFF_LOWER_UP, IFF_DORMANT) or
    its txqlen, or differ in length: a bridge or bond taking the link as a port
    adds IFLA_MASTER (and may change no flag), while a macvtap made on the link
    is an event of the link that changes none of these. The length is the last
    event's (a request's answer may differ: then one more event passes). Call
    again when the followed link changes; a link created with the name passes
    by name before that.
    ``high_deletions``: also pass RTM_DELLINK of any index >= ``HIGH_INDEX``
    (2**30: the macvtaps this plugin numbers from there, to see them move into pods).
    """
    words = _name_words(name)
    p = Program()
    if high_deletions:
        p.load_byte(_IFI_INDEX + _TOP_BYTE)  # an int's top byte: bit 6 is 2**30
        p.jump_if_any(0x40, "high")
        p.jump("own link")
        p.label("high")
        p.load(_NLMSG_TYPE)
        p.mask(b"\xff\xff\0\0")
        p.jump_if(struct.pack("=HH", RTM_DELLINK, 0), "accept")
    p.label("own link")
    if index is not None:
        p.load(_IFI_INDEX)
        p.jump_unless(struct.pack("=i", index), "by name")
        if state is None:
            p.jump("accept")
        else:
            flags, txqlen, size = state
            p.load(0)  # nlmsg_len
            p.jump_unless(struct.pack("=I", size), "accept")
            p.load(_NLMSG_TYPE)
            p.mask(b"\xff\xff\0\0")
            p.jump_if(struct.pack("=HH", RTM_DELLINK, 0), "accept")
            p.load(_IFI_FLAGS)
            p.mask(struct.pack("=I", flags_mask))
            p.jump_unless(struct.pack("=I", flags & flags_mask), "accept")
            for offset, word in enumerate(words):  # the same name...
                p.load(_FIRST_NLA + 4 * offset)
                p.jump_unless(word, "accept")
            if txqlen is not None:  # ... and the same txqlen: nothing we follow changed
                after = _FIRST_NLA + 4 * len(words)
                p.load(after)
                p.jump_unless(struct.pack("=HH", 8, IFLA_TXQLEN), "accept")
                p.load(after + 4)
                p.jump_unless(struct.pack("=I", txqlen), "accept")
            p.jump("reject")
    p.label("by name")
    for offset, word in enumerate(words):
        p.load(_FIRST_NLA + 4 * offset)
        p.jump_unless(word, "reject")
    p.jump("accept")
    p.attach(sock)
