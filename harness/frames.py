"""Ethernet frames through a macvtap's /dev/tapN and through a packet socket.

Frames use an experimental EtherType, so nothing else the kernel sends on a
fresh link (IPv6 neighbour discovery, ...) is mistaken for them, and carry a
random marker so each test recognises its own frame.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable

ETH_P_TEST = 0x88B5  # IEEE 802 "local experimental EtherType 1"
# macvtap opens with IFF_VNET_HDR set: each read and write starts with a
# struct virtio_net_hdr (10 bytes; all zero = no offloads).
VNET_HDR_LEN = 10
_MIN_FRAME = 60  # without FCS


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def frame(dst: str, src: str, payload: bytes) -> bytes:
    """An Ethernet frame of our EtherType, padded to the minimum length."""
    head = mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ETH_P_TEST)
    return (head + payload).ljust(_MIN_FRAME, b"\0")


def packet_socket(ifname: str) -> socket.socket:
    """A raw socket that sees our EtherType on ``ifname`` (in the caller's netns)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    sock.bind((ifname, ETH_P_TEST))
    return sock


def open_tap(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


def write_tap(fd: int, data: bytes) -> None:
    os.write(fd, bytes(VNET_HDR_LEN) + data)


def read_tap(fd: int, marker: bytes, timeout: float = 2.0) -> bytes:
    """The first frame read from tap ``fd`` that carries ``marker`` (header removed)."""
    return _wait_for(fd, lambda: os.read(fd, 65536)[VNET_HDR_LEN:], marker, timeout)


def recv_packet(sock: socket.socket, marker: bytes, timeout: float = 2.0) -> bytes:
    """The first frame received on packet socket ``sock`` that carries ``marker``."""
    return _wait_for(sock.fileno(), lambda: sock.recv(65536), marker, timeout)


def assert_both_ways(tap_path: str, tap_mac: str, peer: socket.socket, peer_mac: str) -> None:
    """A frame to ``tap_mac`` sent on ``peer`` is read from the tap, and one written to the
    tap arrives on ``peer``: the tap is the macvtap on that link, with that address."""
    fd = open_tap(tap_path)
    try:
        inbound = os.urandom(8)
        peer.send(frame(tap_mac, peer_mac, inbound))
        got = read_tap(fd, inbound)
        outbound = os.urandom(8)
        write_tap(fd, frame(peer_mac, tap_mac, outbound))
        sent = recv_packet(peer, outbound)
    finally:
        os.close(fd)
    assert got[:6] == mac_bytes(tap_mac) and got[6:12] == mac_bytes(peer_mac)
    assert sent[:6] == mac_bytes(peer_mac) and sent[6:12] == mac_bytes(tap_mac)


def _wait_for(fd: int, read: Callable[[], bytes], marker: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        data = read()
        if data[12:14] == struct.pack("!H", ETH_P_TEST) and marker in data:
            return data
    raise TimeoutError(f"no frame with marker {marker.hex()} within {timeout} s")
