"""Names other programs depend on: the kubelet checkpoint, the macvtap CNI, probes."""

from __future__ import annotations

import struct

import pytest

from macvtapdp import naming

_P1, _P2, _P3, _P4, _P5 = (
    0x9E3779B185EBCA87,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5,
)
_M = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def _merge(acc: int, val: int) -> int:
    return ((acc ^ _round(0, val)) * _P1 + _P4) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 from the specification, independent of the xxhash package."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], struct.unpack_from("<Q", data, i + 8 * k)[0])
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for k in range(4):
            h = _merge(h, v[k])
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, struct.unpack_from("<Q", data, i)[0]), 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (struct.unpack_from("<I", data, i)[0] * _P1 & _M), 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * _P5 & _M), 11) * _P1) & _M
        i += 1
    h = ((h ^ (h >> 33)) * _P2) & _M
    h = ((h ^ (h >> 29)) * _P3) & _M
    return h ^ (h >> 32)


@pytest.mark.parametrize(
    ("data", "digest"),
    [  # published XXH64 vectors, seed 0
        (b"", 0xEF46DB3751D8E999),
        (b"a", 0xD24EC4F1A98C6E5B),
        (b"abc", 0x44BC2CF5AD770999),
    ],
)
def test_reference_xxh64_matches_published_vectors(data: bytes, digest: int) -> None:
    assert xxh64(data) == digest


def test_interface_name_is_the_cni_name() -> None:
    """mvt + low 48 bits of XXH64(device ID), what macvtap-cni's TemporaryInterfaceName gives."""
    for dev_id in ["eth0Mvp0", "eth0Mvp99", "dataplaneMvp7", "a" * 35 + "Mvp999", "x"]:
        want = f"mvt{xxh64(dev_id.encode()) & 0xFFFFFFFFFFFF:012x}"
        assert naming.interface_name(dev_id) == want
        assert len(want) == 15


def test_interface_names_differ_across_a_large_resource() -> None:
    names = {naming.interface_name(i) for i in naming.device_ids("eth0", 1000)}
    assert len(names) == 1000


def test_device_ids_are_the_go_plugins() -> None:
    assert naming.device_ids("eth0", 3) == ["eth0Mvp0", "eth0Mvp1", "eth0Mvp2"]
    assert naming.resource_name("eth0") == "macvtap.network.kubevirt.io/eth0"


def test_socket_names_keep_the_go_prefix_and_are_fresh() -> None:
    a, b = naming.socket_name("eth0"), naming.socket_name("eth0")
    assert a.startswith("macvtap.network.kubevirt.io_eth0@") and a.endswith(".sock")
    assert a != b


@pytest.mark.parametrize(
    ("name", "filename", "own"),
    [
        ("eth0", "macvtap.network.kubevirt.io_eth0@0a1b2c.sock", True),
        ("eth0", "macvtap.network.kubevirt.io_eth0", True),  # the Go plugin's socket
        ("eth0", "macvtap.network.kubevirt.io_eth01@0a1b2c.sock", False),
        ("eth0", "macvtap.network.kubevirt.io_eth0-x@0a1b2c.sock", False),
        ("eth0-x", "macvtap.network.kubevirt.io_eth0@0a1b2c.sock", False),
        ("eth0", "kubelet.sock", False),
    ],
)
def test_own_sockets_never_match_another_resource(name: str, filename: str, own: bool) -> None:
    assert naming.is_own_socket(name, filename) is own


def test_longest_name_fits_the_unix_socket_limit() -> None:
    longest = naming.max_name_length()
    path = f"{naming.DEFAULT_PLUGIN_DIR}/{naming.socket_name('n' * longest)}"
    assert len(path) == naming.MAX_SOCKET_PATH
