"""Discovery: which links become resources, the filters, and the options that set them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer.main

from macvtapdp import discovery, entry
from macvtapdp.cli import app
from macvtapdp.config import Mode, Resource
from macvtapdp.discovery import Facts, Filters, judge
from macvtapdp.errors import ConfigError
from macvtapdp.rtnl import ARPHRD_ETHER, ARPHRD_LOOPBACK, IFF_LOOPBACK, IFF_UP, Link

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


def test_filters_round_trip_through_options() -> None:
    filters = Filters(include=("dv*", "e?"), exclude=("dvx",), kinds=("veth",))
    argv = filters.argv()
    p = entry._parser("reconcile", entry.RECONCILE_OPTIONS)
    args = vars(p.parse_args(argv))
    again, grace = entry.discovery_settings(
        args["discover_include"], args["discover_exclude"], args["discover_kinds"], None, {}
    )
    assert again == filters and grace == discovery.DEFAULT_GRACE


def test_settings_fall_back_to_the_environment() -> None:
    env = {
        discovery.INCLUDE_VAR: "dv*,eth*",
        discovery.EXCLUDE_VAR: "dvx",
        discovery.KINDS_VAR: "veth bridge",
        discovery.GRACE_VAR: "0.5",
    }
    filters, grace = entry.discovery_settings(None, None, None, None, env)
    assert filters == Filters(include=("dv*", "eth*"), exclude=("dvx",), kinds=("veth", "bridge"))
    assert grace == 0.5
    filters, grace = entry.discovery_settings(["x*"], None, None, 2.0, env)
    assert filters.include == ("x*",) and filters.kinds == ("veth", "bridge") and grace == 2.0


@pytest.mark.parametrize("grace", ["-1", "soon", "nan", "inf"])
def test_a_bad_grace_is_refused(grace: str) -> None:
    with pytest.raises(ConfigError, match="--discover-grace"):
        entry.discovery_settings(None, None, None, grace, {})


def test_reconcile_front_ends_take_the_same_options() -> None:
    """Like ``run`` and ``serve`` (test_cli), ``reconcile`` skips typer."""
    group = typer.main.get_command(app)
    params = group.commands["reconcile"].params  # type: ignore[attr-defined]
    found = {p.opts[0]: p.envvar for p in params if p.param_type_name == "option"}
    assert found == entry.RECONCILE_OPTIONS
    parser = entry._parser("reconcile", entry.RECONCILE_OPTIONS)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h"}
    assert flags == set(entry.RECONCILE_OPTIONS)


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
