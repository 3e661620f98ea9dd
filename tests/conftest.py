"""Shared fixtures. Tests that need the kernel need root; CI runs as root."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# gRPC's C core logs at INFO (every GOAWAY of the kubelet stand-in) unless told otherwise
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from tests.netns import NetNS


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run kernel tests without root rather than skip them silently."""
    needs_root = [i for i in items if i.get_closest_marker("kernel") or i.get_closest_marker("e2e")]
    if needs_root and os.geteuid() != 0:
        pytest.exit(
            f"{len(needs_root)} selected tests need root (network namespaces, macvtap, "
            "supervisord): run as root, or only the unit tests with -m 'not kernel and not e2e'",
            returncode=4,
        )


@pytest.fixture
def netns() -> Iterator[NetNS]:
    """A fresh network namespace, deleted after the test."""
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.close()
