"""The NUMA node of a resource's lower link, for the kubelet's Topology Manager.

A VM pinned to one NUMA node wants its NIC's macvtap there too, so each
device in ListAndWatch carries ``topology.nodes[].ID``: the node of the lower
link's device (``/sys/class/net/<link>/device/numa_node``); for a bond or a
team the node its ports share (``lower_<port>`` links), none when they differ.
No topology at all when the value is -1 (no NUMA, or the firmware does not
say), when it is absent, or when the link is virtual: the Topology Manager
then treats the devices as fitting any node. Read again whenever the link
changes, so a lower link made again on another device is followed.
"""

from __future__ import annotations

import os

from macvtapdp.linux.link import Link

AGGREGATES = frozenset({"bond", "team"})


def _device_node(net: str, name: str) -> int | None:
    try:
        with open(os.path.join(net, name, "device", "numa_node"), encoding="ascii") as fh:
            node = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _ports(net: str, name: str) -> list[str]:
    try:
        entries = os.listdir(os.path.join(net, name))
    except OSError:
        return []
    return sorted(e.removeprefix("lower_") for e in entries if e.startswith("lower_"))


def numa_nodes(link: Link | None, sysfs: str = "/sys") -> tuple[int, ...] | None:
    """The NUMA nodes to report for devices on ``link``; None for no topology."""
    if link is None:
        return None
    net = os.path.join(sysfs, "class", "net")
    if link.kind in AGGREGATES:
        nodes = {_device_node(net, port) for port in _ports(net, link.name)}
        if len(nodes) != 1 or None in nodes:
            return None
        (node,) = nodes
        return None if node is None else (node,)
    node = _device_node(net, link.name)  # a virtual link (veth, vlan...) has no device
    return None if node is None else (node,)
