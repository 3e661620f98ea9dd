"""Shared fixtures. Tests that need the kernel need root; CI runs as root.

Every run as root also makes the machine look shared, as CI machines are
(``shared_machine``): stale ``/dev/tap*`` nodes that point at devices which no
longer exist, at the low numbers and at the first /dev/tapN each test device
would pick, and another network namespace's macvtaps holding such numbers.
The suite must pass in spite of them, as the plugin must on such a node.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

import pytest

# gRPC's C core logs at INFO (every GOAWAY of the kubelet stand-in) unless told otherwise
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from harness.netns import NetNS

# The device IDs the kernel and end-to-end tests allocate most
TEST_DEVICES = [f"{n}Mvp{i}" for n in ("lw0", "lower0", "eth0", "a", "b", "rb") for i in range(4)]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run kernel tests without root rather than skip them silently."""
    needs_root = [
        i
        for i in items
        if i.get_closest_marker("kernel")
        or i.get_closest_marker("e2e")
        or i.get_closest_marker("fault")
    ]
    if needs_root and os.geteuid() != 0:
        pytest.exit(
            f"{len(needs_root)} selected tests need root (network namespaces, macvtap, "
            "supervisord): run as root, or only the unit tests: pytest tests/unit",
            returncode=4,
        )


def _macvtap_major() -> int | None:
    with open("/proc/devices", encoding="ascii") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 2 and parts[1] == "macvtap":
                return int(parts[0])
    return None


@pytest.fixture(scope="session", autouse=True)
def shared_machine() -> Iterator[None]:
    """Stale /dev/tap* nodes and a foreign namespace's macvtaps, for the whole run."""
    if os.geteuid() != 0 or (major := _macvtap_major()) is None:
        yield
        return
    from macvtapdp.plugin.macvtap import candidates

    planted: list[tuple[str, int]] = []
    numbers = list(range(2, 41)) + [candidates(d)[0] for d in TEST_DEVICES[::2]]
    for i, n in enumerate(numbers):
        path = f"/dev/tap{n}"
        rdev = os.makedev(major, 60000 + i)  # a minor no macvtap has
        if not os.path.lexists(path):
            os.mknod(path, 0o600 | stat.S_IFCHR, rdev)
            planted.append((path, rdev))
    foreign = NetNS()
    try:
        foreign.veth("fl0")
        for n, dev in enumerate(TEST_DEVICES[1::2]):
            index = candidates(dev)[0]
            if not os.path.lexists(f"/dev/tap{index}"):
                foreign.ip(
                    "link", "add", "link", "fl0", "name", f"fmv{n}", "index", str(index),
                    "type", "macvtap",
                )  # fmt: skip
        yield
    finally:
        foreign.close()
        for path, rdev in planted:
            with contextlib.suppress(OSError):
                if os.stat(path).st_rdev == rdev:
                    os.unlink(path)


@pytest.fixture
def netns() -> Iterator[NetNS]:
    """A fresh network namespace, deleted after the test."""
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.close()
