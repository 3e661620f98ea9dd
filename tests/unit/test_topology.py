"""NUMA nodes of a lower link, read from a prepared sysfs tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from macvtapdp.linux.link import Link
from macvtapdp.plugin.topology import numa_nodes


def nic(root: Path, name: str, node: str | None) -> None:
    device = root / "devices" / f"pci-{name}"
    device.mkdir(parents=True)
    if node is not None:
        (device / "numa_node").write_text(f"{node}\n")
    net = root / "class" / "net" / name
    net.mkdir(parents=True)
    (net / "device").symlink_to(device)


def aggregate(root: Path, name: str, *ports: str) -> None:
    net = root / "class" / "net" / name
    net.mkdir(parents=True)
    for port in ports:
        (net / f"lower_{port}").symlink_to(root / "class" / "net" / port)


@pytest.mark.parametrize(("value", "want"), [("1", (1,)), ("0", (0,)), ("-1", None), (None, None)])
def test_a_nic_reports_its_device_numa_node(
    tmp_path: Path, value: str | None, want: object
) -> None:
    nic(tmp_path, "ens1", value)
    assert numa_nodes(Link(index=2, name="ens1"), str(tmp_path)) == want


def test_virtual_links_and_missing_ones_have_no_topology(tmp_path: Path) -> None:
    (tmp_path / "class" / "net" / "veth0").mkdir(parents=True)  # no device behind it
    assert numa_nodes(Link(index=2, name="veth0", kind="veth"), str(tmp_path)) is None
    assert numa_nodes(Link(index=3, name="gone0"), str(tmp_path)) is None
    assert numa_nodes(None, str(tmp_path)) is None


@pytest.mark.parametrize("kind", ["bond", "team"])
def test_a_bond_or_team_reports_the_node_its_ports_share(tmp_path: Path, kind: str) -> None:
    nic(tmp_path, "ens1", "1")
    nic(tmp_path, "ens2", "1")
    nic(tmp_path, "ens3", "0")
    nic(tmp_path, "ens4", "-1")
    aggregate(tmp_path, "same0", "ens1", "ens2")
    aggregate(tmp_path, "split0", "ens1", "ens3")
    aggregate(tmp_path, "unknown0", "ens1", "ens4")
    aggregate(tmp_path, "empty0")
    root = str(tmp_path)
    assert numa_nodes(Link(index=5, name="same0", kind=kind), root) == (1,)
    assert numa_nodes(Link(index=6, name="split0", kind=kind), root) is None
    assert numa_nodes(Link(index=7, name="unknown0", kind=kind), root) is None
    assert numa_nodes(Link(index=8, name="empty0", kind=kind), root) is None
