"""Discovery mode: which links of the node become resources.

Without a configuration (``DP_MACVTAP_CONF`` unset or ``[]``) every suitable
lower link is offered as a resource of its own name, in bridge mode with 100
devices. The Go plugin offered every link netlink calls a "device" (no link
kind) or a bond, and users saw ``teql0``, ``usb0`` and ``thunderbolt0`` appear
as resources (kubevirt/macvtap-cni#115, CNAO#1512). Our rule, from the link as
rtnetlink describes it and from ``/sys/class/net/<name>`` (in the process's own
network namespace's view of sysfs):

- never: loopback; links that are not Ethernet (``teql0`` is ``ARPHRD_VOID``,
  tunnels and wireguard are not Ethernet either; the kernel refuses a macvtap on
  them); macvtaps (what this plugin creates); links enslaved to a bond, bridge,
  team or Open vSwitch (the kernel refuses a macvtap on them: EBUSY; the bond
  or bridge itself is the lower link to use);
- by default: physical NICs, i.e. links without a link kind that have a device
  behind them (``/sys/class/net/<name>/device``) on any bus but USB and
  Thunderbolt and that are not wireless; and bonds;
- on request only (``--discover-kinds``): links of any other kind (``veth``,
  ``bridge``, ``vlan``, ``macvlan``, ``team``, ``tun``, ...), and the categories
  ``usb`` (``usb0`` is mostly a BMC's or a phone's USB network function; but a
  Raspberry Pi's ``eth0`` is on USB too), ``thunderbolt`` (``thunderbolt0``, a
  host-to-host cable link), ``wireless`` (Wi-Fi cannot carry several MAC
  addresses in client mode) and ``virtual`` (no kind and no device).

Name filters narrow the result: ``--discover-include`` globs (a link must match
one) and ``--discover-exclude`` globs (a link must match none). A link whose
name cannot be a resource name (see ``config.name_problem``) is left out, with a
note. Nothing here imports grpc.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from macvtapdp import config, naming, settings
from macvtapdp.errors import ConfigError
from macvtapdp.linux.link import ARPHRD_ETHER, IFF_LOOPBACK, Link

SYSFS_NET = "/sys/class/net"
DEFAULT_KINDS = frozenset({"physical", "bond"})
PERIPHERAL_BUSES = frozenset({"usb", "thunderbolt"})
NEVER_KINDS = frozenset({"macvtap"})
# A master that takes the port's receive path (rx_handler): a macvtap on the port is EBUSY.
# A VRF does not, so its ports stay usable.
_FREE_SLAVE_KINDS = frozenset({"vrf"})


def split(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """Option values or an environment variable: comma- or space-separated items."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(item for value in values for item in value.replace(",", " ").split())


@dataclass(frozen=True)
class Filters:
    """What an operator narrowed or widened discovery to."""

    include: tuple[str, ...] = ()  # globs: only names matching one of them
    exclude: tuple[str, ...] = ()  # globs: never names matching one of them
    kinds: tuple[str, ...] = ()  # link kinds or categories admitted besides physical and bond

    @classmethod
    def of(cls, discovery: settings.Discovery) -> Filters:
        """The filters ``discovery`` asks for (ConfigError if they ask for the impossible)."""
        return cls(
            include=split(discovery.discover_include),
            exclude=split(discovery.discover_exclude),
            kinds=split(discovery.discover_kinds),
        )

    def __post_init__(self) -> None:
        never = sorted(NEVER_KINDS.intersection(self.kinds))
        if never:
            raise ConfigError(
                [
                    f"--discover-kinds: {k} links are never offered (this plugin makes them)"
                    for k in never
                ]
            )

    @property
    def admitted(self) -> frozenset[str]:
        return DEFAULT_KINDS | frozenset(self.kinds)

    def name_admitted(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)

    def describe(self) -> str:
        parts = [f"kinds {', '.join(sorted(self.admitted))}"]
        if self.include:
            parts.append(f"names matching {' or '.join(self.include)}")
        if self.exclude:
            parts.append(f"except {', '.join(self.exclude)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Facts:
    """What sysfs tells about a link beyond rtnetlink."""

    device: bool = False  # /sys/class/net/<name>/device exists: hardware behind it
    bus: str | None = None  # the device's bus (subsystem): pci, virtio, usb, platform...
    wireless: bool = False  # /sys/class/net/<name>/wireless or phy80211


def sysfs_facts(name: str, root: str = SYSFS_NET) -> Facts:
    """The Facts of link ``name`` from sysfs (all False for a link that is gone)."""
    base = os.path.join(root, name)
    device = os.path.join(base, "device")
    try:
        bus: str | None = os.path.basename(os.readlink(os.path.join(device, "subsystem")))
    except OSError:
        bus = None
    wireless = any(os.path.exists(os.path.join(base, x)) for x in ("wireless", "phy80211"))
    return Facts(device=os.path.exists(device), bus=bus, wireless=wireless)


def category(link: Link, facts: Facts) -> str:
    """``physical``, ``usb``, ``thunderbolt``, ``wireless``, ``virtual``, or the link's kind."""
    if link.kind:
        return link.kind
    if not facts.device:
        return "virtual"
    if facts.wireless:
        return "wireless"
    if facts.bus in PERIPHERAL_BUSES:
        return facts.bus
    return "physical"


@dataclass(frozen=True)
class Verdict:
    """Whether a link is offered; if not, why, and whether that deserves a log line."""

    offered: bool
    reason: str = ""
    notable: bool = False  # would be offered but for this reason: tell the operator


def judge(link: Link, facts: Facts, filters: Filters, plugin_dir: str) -> Verdict:
    """Whether ``link`` is offered as a resource under ``filters``."""
    if link.flags & IFF_LOOPBACK:
        return Verdict(False, "loopback")
    if link.link_type != ARPHRD_ETHER:
        return Verdict(False, f"not an Ethernet link (ARPHRD {link.link_type})")
    kind = category(link, facts)
    if kind in NEVER_KINDS:
        return Verdict(False, f"a {kind} link")
    wanted = kind in filters.admitted
    if link.master_index is not None and link.slave_kind not in _FREE_SLAVE_KINDS:
        port = f"a port of a {link.slave_kind}" if link.slave_kind else "enslaved"
        return Verdict(False, f"{port} (use its master as the lower link)", notable=wanted)
    if not wanted:
        hint = kind in PERIPHERAL_BUSES or kind == "wireless"
        return Verdict(False, f"a {kind} link (admit with --discover-kinds={kind})", notable=hint)
    if not filters.name_admitted(link.name):
        return Verdict(False, "left out by the name filters")
    problem = config.name_problem(link.name)
    limit = naming.max_name_length(plugin_dir)
    if problem is None and len(link.name) > limit:
        problem = f"too long for plugin directory {plugin_dir} (at most {limit} characters)"
    if problem is not None:
        return Verdict(False, f"cannot name a resource: {problem}", notable=True)
    return Verdict(True)


def resource(name: str) -> config.Resource:
    """The resource discovery offers for link ``name``: bridge mode, default capacity."""
    return config.Resource(name=name, lower=name)


FactsOf = Callable[[str], Facts]


def classify(
    links: Iterable[Link], filters: Filters, plugin_dir: str, facts_of: FactsOf = sysfs_facts
) -> dict[str, Verdict]:
    """Every link's verdict, by name; past ``config.MAX_RESOURCES`` offered, no more."""
    verdicts = {link.name: judge(link, facts_of(link.name), filters, plugin_dir) for link in links}
    offered = [name for name in sorted(verdicts) if verdicts[name].offered]
    for name in offered[config.MAX_RESOURCES :]:
        verdicts[name] = Verdict(
            False, f"more than {config.MAX_RESOURCES} links offered (narrow the filters)", True
        )
    return verdicts


def offered(verdicts: dict[str, Verdict]) -> list[config.Resource]:
    """The resources of the offered links, sorted by name."""
    return [resource(name) for name in sorted(verdicts) if verdicts[name].offered]


def scan(filters: Filters, plugin_dir: str) -> dict[str, Verdict]:
    """Classify the links of this network namespace now."""
    # Loaded here: `run` and `render-config` of a configuration need no netlink client
    from macvtapdp.linux.netlink import Netlink

    with Netlink() as netlink:
        return classify(netlink.links(), filters, plugin_dir)
