"""Discovery: which links become resources, the filters, and the options that set them."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from macvtapdp import config, settings
from macvtapdp.config import Mode, Resource
from macvtapdp.errors import ConfigError
from macvtapdp.linux.link import ARPHRD_ETHER, IFF_LOOPBACK, IFF_UP, Link
from macvtapdp.node import discovery
from macvtapdp.node.discovery import Facts, Filters, judge

ARPHRD_LOOPBACK = 772

PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
ARPHRD_VOID = 0xFFFF  # teql
ARPHRD_NONE = 0xFFFE  # wireguard
ARPHRD_TUNNEL = 768  # ipip
PCI = Facts(device=True, bus="pci")


def link(name: str, kind: str | None = None, **fields: object) -> Link:
    values: dict[str, object] = {"index": 7, "name": name, "flags": IFF_UP, "kind": kind}
    return Link(**{**values, **fields})  # type: ignore[arg-type]


# name, link, sysfs facts, offered by default, category, worth a log line
TABLE: list[tuple[str, Link, Facts, bool, str, bool]] = [
    (
        "loopback",
        link("lo", flags=IFF_UP | IFF_LOOPBACK, link_type=ARPHRD_LOOPBACK),
        Facts(),
        False,
        "virtual",
        False,
    ),
    ("PCI NIC", link("enp3s0"), PCI, True, "physical", False),
    ("virtio NIC", link("eth0"), Facts(device=True, bus="virtio"), True, "physical", False),
    ("platform NIC", link("end0"), Facts(device=True, bus="platform"), True, "physical", False),
    ("bond", link("bond0", "bond"), Facts(), True, "bond", False),
    ("veth", link("veth1a2b", "veth"), Facts(), False, "veth", False),
    ("bridge", link("br0", "bridge"), Facts(), False, "bridge", False),
    ("vlan", link("eth0.100", "vlan"), Facts(), False, "vlan", False),
    ("macvlan", link("mv0", "macvlan"), Facts(), False, "macvlan", False),
    ("macvtap", link("mvt0123456789ab", "macvtap"), Facts(), False, "macvtap", False),
    ("tap", link("tap0", "tun"), Facts(), False, "tun", False),
    ("ifb", link("ifb0", "ifb"), Facts(), False, "ifb", False),
    ("gretap", link("gretap0", "gretap"), Facts(), False, "gretap", False),
    ("team", link("team0", "team"), Facts(), False, "team", False),
    # teql has no link kind and no device, and is not Ethernet: the Go plugin offered it
    ("teql0", link("teql0", link_type=ARPHRD_VOID), Facts(), False, "virtual", False),
    ("ipip", link("tunl0", "ipip", link_type=ARPHRD_TUNNEL), Facts(), False, "ipip", False),
    ("wireguard", link("wg0", "wireguard", link_type=ARPHRD_NONE), Facts(), False, "", False),
    ("no kind, no device", link("odd0"), Facts(), False, "virtual", False),
    # a BMC's or a phone's USB network function: the Go plugin offered it
    ("usb0", link("usb0"), Facts(device=True, bus="usb"), False, "usb", True),
    (
        "thunderbolt0",
        link("thunderbolt0"),
        Facts(device=True, bus="thunderbolt"),
        False,
        "thunderbolt",
        True,
    ),
    (
        "Wi-Fi",
        link("wlp2s0"),
        Facts(device=True, bus="pci", wireless=True),
        False,
        "wireless",
        True,
    ),
    (
        "bond port",
        link("enp3s0", master_index=3, slave_kind="bond"),
        PCI,
        False,
        "physical",
        True,
    ),
    (
        "bridge port",
        link("enp3s0", master_index=3, slave_kind="bridge"),
        PCI,
        False,
        "physical",
        True,
    ),
    (
        "veth in a bridge",
        link("veth9", "veth", master_index=3, slave_kind="bridge"),
        Facts(),
        False,
        "veth",
        False,
    ),
    ("VRF port", link("enp3s0", master_index=3, slave_kind="vrf"), PCI, True, "physical", False),
    ("bad name", link("eth#0"), PCI, False, "physical", True),
]


@pytest.mark.parametrize(
    ("link_", "facts", "offered", "kind", "notable"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_classification(link_: Link, facts: Facts, offered: bool, kind: str, notable: bool) -> None:
    verdict = judge(link_, facts, Filters(), PLUGIN_DIR)
    assert verdict.offered == offered, verdict
    assert verdict.notable == notable, verdict
    assert bool(verdict.reason) != offered
    if kind and link_.link_type == ARPHRD_ETHER and not link_.flags & IFF_LOOPBACK:
        assert discovery.category(link_, facts) == kind


@pytest.mark.parametrize("kind", ["veth", "bridge", "vlan", "macvlan", "tun", "team"])
def test_kinds_filter_admits_a_virtual_kind(kind: str) -> None:
    lnk = link("x0", kind)
    assert not judge(lnk, Facts(), Filters(), PLUGIN_DIR).offered
    assert judge(lnk, Facts(), Filters(kinds=(kind,)), PLUGIN_DIR).offered
    assert not judge(lnk, Facts(), Filters(kinds=("other",)), PLUGIN_DIR).offered


@pytest.mark.parametrize(
    ("kind", "facts"),
    [
        ("usb", Facts(device=True, bus="usb")),
        ("thunderbolt", Facts(device=True, bus="thunderbolt")),
        ("wireless", Facts(device=True, bus="pci", wireless=True)),
        ("virtual", Facts()),
    ],
)
def test_kinds_filter_admits_the_categories(kind: str, facts: Facts) -> None:
    assert not judge(link("n0"), facts, Filters(), PLUGIN_DIR).offered
    assert judge(link("n0"), facts, Filters(kinds=(kind,)), PLUGIN_DIR).offered


def test_nothing_admits_loopback_non_ethernet_macvtaps_or_ports() -> None:
    every = Filters(kinds=("veth", "bridge", "virtual", "usb", "wireless", "ipip", "teql"))
    never = [
        link("lo", flags=IFF_LOOPBACK, link_type=ARPHRD_LOOPBACK),
        link("teql0", link_type=ARPHRD_VOID),
        link("tunl0", "ipip", link_type=ARPHRD_TUNNEL),
        link("veth0", "veth", master_index=2, slave_kind="bridge"),
    ]
    for lnk in never:
        assert not judge(lnk, Facts(), every, PLUGIN_DIR).offered, lnk
    with pytest.raises(ConfigError, match="macvtap links are never offered"):
        Filters(kinds=("veth", "macvtap"))


def test_include_narrows_and_exclude_removes() -> None:
    links = [link(n) for n in ("eth0", "eth1", "ens3", "bond0")] + [link("dv0", "veth")]
    facts = {"bond0": Facts()}

    def names(filters: Filters) -> list[str]:
        verdicts = discovery.classify(
            [lnk if lnk.name != "bond0" else link("bond0", "bond") for lnk in links],
            filters,
            PLUGIN_DIR,
            lambda n: facts.get(n, PCI),
        )
        return [r.name for r in discovery.offered(verdicts)]

    assert names(Filters()) == ["bond0", "ens3", "eth0", "eth1"]
    assert names(Filters(include=("eth*",))) == ["eth0", "eth1"]
    assert names(Filters(include=("eth*", "bond?"))) == ["bond0", "eth0", "eth1"]
    assert names(Filters(exclude=("eth1",))) == ["bond0", "ens3", "eth0"]
    assert names(Filters(include=("e*",), exclude=("*1",))) == ["ens3", "eth0"]
    # include does not admit a kind; kinds does
    assert names(Filters(include=("dv*",))) == []
    assert names(Filters(include=("dv*",), kinds=("veth",))) == ["dv0"]
    assert names(Filters(include=("ETH*",))) == []  # case matters, as in link names


def test_offered_resources_are_bridge_mode_with_default_capacity() -> None:
    assert discovery.resource("eth0") == Resource("eth0", "eth0", Mode.BRIDGE, 100)


def test_a_name_too_long_for_the_plugin_dir_is_left_out_with_a_note() -> None:
    name = "enp0s20f0u1u2"  # 13 characters
    deep = "/" + "d" * 60
    assert judge(link(name), PCI, Filters(), PLUGIN_DIR).offered
    verdict = judge(link(name), PCI, Filters(), deep)
    assert not verdict.offered and verdict.notable and "too long" in verdict.reason


def test_split_takes_commas_and_spaces() -> None:
    assert discovery.split(None) == ()
    assert discovery.split("a*, b* c") == ("a*", "b*", "c")
    assert discovery.split(["x,y", "z"]) == ("x", "y", "z")


def test_filters_round_trip_through_the_reconcile_command_line() -> None:
    node = settings.Node(
        discovery=settings.Discovery(
            discover_include=("dv*", "e?"), discover_exclude=("dvx",), discover_kinds=("veth",)
        )
    )
    again = settings.from_argv(settings.Node, settings.to_argv(node))
    assert again == node
    assert Filters.of(again.discovery) == Filters(
        include=("dv*", "e?"), exclude=("dvx",), kinds=("veth",)
    )


def test_the_environment_sets_the_filters_as_run_reads_it() -> None:
    env = {
        settings.DISCOVER_INCLUDE.env or "": "dv*,eth*",
        settings.DISCOVER_KINDS.env or "": "veth bridge",
        settings.DISCOVER_GRACE.env or "": "0.5",
        "DP_MACVTAP_CONF": "[]",
    }
    done = subprocess.run(
        [sys.executable, "-m", "macvtapdp", "render-config"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    [reconcile] = [line for line in done.stdout.splitlines() if "macvtapdp.node.reconcile" in line]
    argv = shlex.split(reconcile.removeprefix("command="))
    node = settings.from_argv(settings.Node, argv[3:])
    assert node.discovery == settings.Discovery(
        discover_include=("dv*", "eth*"), discover_kinds=("veth", "bridge"), discover_grace=0.5
    )


def test_no_more_than_the_resource_cap_is_offered() -> None:
    links = [link(f"eth{i}", index=i + 2) for i in range(config.MAX_RESOURCES + 3)]
    verdicts = discovery.classify(links, Filters(), PLUGIN_DIR, lambda n: PCI)
    assert len(discovery.offered(verdicts)) == config.MAX_RESOURCES
    left = [v for v in verdicts.values() if not v.offered]
    assert len(left) == 3 and all(v.notable and "more than" in v.reason for v in left)


def test_sysfs_facts(tmp_path: Path) -> None:
    net = tmp_path / "class" / "net"
    bus = tmp_path / "bus"
    for name in ("pci", "usb"):
        (bus / name).mkdir(parents=True)
    devices = tmp_path / "devices"
    for name, subsystem in (("enp3s0", "pci"), ("usb0", "usb"), ("wlan0", "pci")):
        dev = devices / name
        dev.mkdir(parents=True)
        os.symlink(bus / subsystem, dev / "subsystem")
        (net / name).mkdir(parents=True)
        os.symlink(dev, net / name / "device")
    (net / "wlan0" / "phy80211").mkdir()
    (net / "veth0").mkdir()
    root = str(net)
    assert discovery.sysfs_facts("enp3s0", root) == Facts(device=True, bus="pci")
    assert discovery.sysfs_facts("usb0", root) == Facts(device=True, bus="usb")
    assert discovery.sysfs_facts("wlan0", root) == Facts(device=True, bus="pci", wireless=True)
    assert discovery.sysfs_facts("veth0", root) == Facts()
    assert discovery.sysfs_facts("gone", root) == Facts()
