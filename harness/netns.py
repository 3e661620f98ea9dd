"""Network namespaces with veth lower links, for tests that use the real kernel.

Each test gets its own namespace, so tests never see each other's links and a
failed test leaves nothing in the host namespace. Links are made and inspected
with iproute2 (``ip -j``), independently of macvtapdp's own netlink code, so the
tests check our code against a second implementation.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetNS:
    """A named network namespace (``ip netns add``), deleted by ``close``."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"mdp-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")

    def close(self) -> None:
        """Delete the links first: ``ip netns del`` frees them later, in the background,
        and a macvtap still alive then keeps its ``/dev/tapN`` from the next test's."""
        for link in self.links():
            if link["ifname"] != "lo":
                self.ip("link", "del", "dev", link["ifname"], check=False)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n <ns> ARGS`` and return its completed process."""
        return subprocess.run(
            ["ip", "-n", self.name, *args], check=check, capture_output=True, text=True
        )

    def veth(self, lower: str, peer: str | None = None, up: bool = True) -> None:
        """Create veth ``lower`` (the lower link under test) and its peer, both up."""
        peer = peer or f"{lower}p"
        self.ip("link", "add", lower, "type", "veth", "peer", "name", peer)
        if up:
            self.ip("link", "set", peer, "up")
            self.ip("link", "set", lower, "up")

    def link(self, name: str) -> dict[str, Any] | None:
        """``ip -d -j link show NAME`` as a dict, or None if there is no such link."""
        done = self.ip("-d", "-j", "link", "show", "dev", name, check=False)
        if done.returncode != 0:
            return None
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found[0]

    def links(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.ip("-d", "-j", "link", "show").stdout)
        return found

    def macvtaps(self) -> list[dict[str, Any]]:
        """Every macvtap in the namespace."""
        return [
            link for link in self.links() if link.get("linkinfo", {}).get("info_kind") == "macvtap"
        ]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread inside the namespace (sockets made here stay in it)."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.name}") as ns:
            _setns(ns.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    @contextlib.contextmanager
    def sysfs(self) -> Iterator[str]:
        """A sysfs mounted from inside the namespace: its view of /sys/class/net.

        ``ip netns exec`` does the same for the programs it runs; a test thread
        that only entered the namespace would otherwise see the host's /sys.
        """
        target = tempfile.mkdtemp(prefix="mdp-sys-")
        with self.entered():
            if _libc.mount(b"sysfs", target.encode(), b"sysfs", 0, None) != 0:
                err = ctypes.get_errno()
                os.rmdir(target)
                raise OSError(err, f"mount sysfs: {os.strerror(err)}")
        try:
            yield target
        finally:
            _libc.umount2(target.encode(), MNT_DETACH)
            os.rmdir(target)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace (with its own /sys)."""
        return ["ip", "netns", "exec", self.name, *argv]
