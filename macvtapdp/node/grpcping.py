"""Whether a device plugin answers GetDevicePluginOptions on its socket, without grpc.

``macvtapdp status`` (the readiness probe) asks every resource on every call,
and importing grpc alone costs 120 ms of CPU and 20 MiB, more than the whole
probe may. So the one unary call is made by hand: HTTP/2 with prior knowledge
over the unix socket (RFC 9113), the request's headers as HPACK literals
(RFC 7541 6.2.2: no Huffman code, no dynamic table), the empty request
message, and the answer read frame by frame until its stream ends.

The answer's headers are not decoded (HPACK with Huffman would be most of this
module). gRPC sends a message only with a successful unary answer; an error
is a trailers-only answer. So: a DATA frame holding a whole, uncompressed gRPC
message, then the end of the stream, and no reset, is an answer.
"""

from __future__ import annotations

import socket
import struct
import time

METHOD = "/v1beta1.DevicePlugin/GetDevicePluginOptions"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM = ACK = 0x1
END_HEADERS, PADDED = 0x4, 0x8
STREAM = 1
MAX_FRAME = 16384  # the default SETTINGS_MAX_FRAME_SIZE, which we never raise


def _literal(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 127  # a one-byte length, Huffman bit clear
    return bytes([len(raw)]) + raw


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def request(method: str = METHOD) -> bytes:
    """Everything the client sends: preface, SETTINGS, HEADERS and the empty message."""
    headers = (
        b"\x83"  # :method POST (static table 3)
        + b"\x86"  # :scheme http (6)
        + b"\x04" + _literal(method)  # :path (4), literal without indexing
        + b"\x01" + _literal("localhost")  # :authority (1)
        + b"\x0f\x10" + _literal("application/grpc")  # content-type (31)
        + b"\x00" + _literal("te") + _literal("trailers")
    )  # fmt: skip
    return (
        PREFACE
        + _frame(SETTINGS, 0, 0)
        + _frame(HEADERS, END_HEADERS, STREAM, headers)
        + _frame(DATA, END_STREAM, STREAM, b"\x00\x00\x00\x00\x00")  # uncompressed, 0 bytes
    )


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buffer = sock, deadline, b""

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def frame(self) -> tuple[int, int, int, bytes]:
        head = self.exactly(9)
        length = int.from_bytes(head[:3], "big")
        if length > MAX_FRAME:
            raise ConnectionError(f"frame of {length} bytes")
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        return head[3], head[4], stream, self.exactly(length)


def answers(socket_path: str, timeout: float) -> bool:
    """Whether the server on ``socket_path`` answers the call with a message within ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(request())
            return _follow(sock, _Reader(sock, deadline))
    except (OSError, ValueError):
        return False


def _follow(sock: socket.socket, reader: _Reader) -> bool:
    message = b""
    while True:
        kind, flags, stream, payload = reader.frame()
        if kind == SETTINGS and not flags & ACK:
            sock.sendall(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            sock.sendall(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY or (kind == RST_STREAM and stream == STREAM):
            return False
        elif stream != STREAM or kind not in (DATA, HEADERS):
            continue
        if kind == DATA:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            message += payload
        if flags & END_STREAM:
            return _whole_message(message)


def _whole_message(data: bytes) -> bool:
    """One uncompressed length-prefixed gRPC message, and nothing else."""
    return len(data) >= 5 and data[0] == 0 and int.from_bytes(data[1:5], "big") == len(data) - 5
