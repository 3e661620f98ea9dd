"""A network interface as the kernel describes it, and the kernel's constants about it.

Plain data (``netlink`` fills it in from pyroute2's messages), so that the node
side can reason about links without loading the netlink client: ``render-config``
of a configuration never lists a link.
"""

from __future__ import annotations

from dataclasses import dataclass

# <linux/if.h> interface flags; IFF_RUNNING is exactly "operstate UP or UNKNOWN"
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
IFF_LOWER_UP, IFF_DORMANT = 0x10000, 0x20000
ARPHRD_ETHER = 1  # <linux/if_arp.h>


@dataclass(frozen=True)
class Link:
    """One network interface as RTM_NEWLINK (or RTM_DELLINK) describes it."""

    index: int
    name: str
    flags: int = 0  # ifi_flags (IFF_*)
    operstate: str = "UNKNOWN"  # IFLA_OPERSTATE: UP, DOWN, LOWERLAYERDOWN, ...
    kind: str | None = None  # IFLA_INFO_KIND: "veth", "macvtap", ...; None for physical
    lower_index: int | None = None  # IFLA_LINK when it is not the link itself
    link_netnsid: int | None = None  # set when the lower link lives in another netns
    txqlen: int | None = None
    mtu: int | None = None
    macvlan_mode: str | None = None  # "bridge", "vepa", ... for macvlan/macvtap
    slave_kind: str | None = None  # IFLA_INFO_SLAVE_KIND: "bridge", "bond", ...
    master_index: int | None = None  # IFLA_MASTER: the bond, bridge or team above it
    link_type: int = ARPHRD_ETHER  # ifi_type
    altnames: tuple[str, ...] = ()  # IFLA_PROP_LIST / IFLA_ALT_IFNAME
    new_netnsid: int | None = None  # RTM_DELLINK of a move to another netns
    new_index: int | None = None  # ... and the ifindex it has there
    size: int = 0  # the message's length: an attribute added or dropped changes it

    @property
    def admin_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def oper_ok(self) -> bool:
        """Operationally usable: UP, or UNKNOWN for drivers that do not report it."""
        return self.operstate in ("UP", "UNKNOWN")
