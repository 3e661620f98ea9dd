"""DP_MACVTAP_CONF: the Go plugin's format, validated up front, every problem at once."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from macvtapdp import config
from macvtapdp.config import Mode, Resource
from macvtapdp.errors import ConfigError

GOOD = [
    (
        "seed example",
        '[{"name":"eth0","master":"eth0","mode":"bridge","capacity":50}]',
        [Resource("eth0", "eth0", Mode.BRIDGE, 50)],
    ),
    (
        "defaults",
        '[{"name":"dataplane","master":"ens3"}]',
        [Resource("dataplane", "ens3", Mode.BRIDGE, 100)],
    ),
    (
        "lowerDevice alias",
        '[{"name":"a","lowerDevice":"bond0","mode":"vepa","capacity":1000}]',
        [Resource("a", "bond0", Mode.VEPA, 1000)],
    ),
    (
        "empty mode is bridge",
        '[{"name":"a","master":"x","mode":""}]',
        [Resource("a", "x", Mode.BRIDGE, 100)],
    ),
    (
        "passthru defaults to 1",
        '[{"name":"p","master":"ens4","mode":"passthru"}]',
        [Resource("p", "ens4", Mode.PASSTHRU, 1)],
    ),
    (
        "two on one link",
        '[{"name":"a","master":"x","mode":"private"},{"name":"b","master":"x"}]',
        [Resource("a", "x", Mode.PRIVATE, 100), Resource("b", "x", Mode.BRIDGE, 100)],
    ),
    (
        "names with dots",
        '[{"name":"net.a-1_b","master":"eth0.100"}]',
        [Resource("net.a-1_b", "eth0.100", Mode.BRIDGE, 100)],
    ),
]

C = "DP_MACVTAP_CONF"
BAD = [
    ("not JSON", "[{", [f"{C}: invalid JSON: Expecting property name enclosed in double quotes "
                        "(line 1, column 3)"]),
    ("not an array", '{"name":"a"}', [f'{C}: must be a JSON array of resources, got an object']),
    ("element not object", '["eth0"]', [f'{C}[0]: must be an object, got "eth0" (a string)']),
    ("missing fields", "[{}]", [f"{C}[0].name: is required",
                                f'{C}[0].master: is required (or its alias "lowerDevice")']),
    ("unknown key", '[{"name":"a","master":"x","capcity":3}]',
     [f'{C}[0]: unknown key "capcity"; expected one of: '
      "name, master, lowerDevice, mode, capacity"]),
    ("duplicate key", '[{"name":"a","name":"b","master":"x"}]',
     [f'{C}: invalid JSON: duplicate key "name"']),
    ("both spellings", '[{"name":"a","master":"x","lowerDevice":"x"}]',
     [f'{C}[0]: give "master" or its alias "lowerDevice", not both']),
    ("bad name", '[{"name":"eth/0","master":"x"}]',
     [f'{C}[0].name: "eth/0" is not a valid resource name: use letters, digits, "-", "_" or ".", '
      "starting and ending with a letter or digit"]),
    ("name too long", json.dumps([{"name": "n" * 36, "master": "x"}]),
     [f'{C}[0].name: "{"n" * 36}" is too long (36 characters, at most 35, so that its socket '
      "path fits the 107-byte unix socket limit)"]),
    ("name wrong type", '[{"name":7,"master":"x"}]',
     [f"{C}[0].name: must be a string, got 7 (an integer)"]),
    ("bad ifname", '[{"name":"a","master":"eth0 "}]',
     [f'{C}[0].master: "eth0 " is not a valid interface name (1-15 printable ASCII characters, '
      'not "." or "..", no "/", ":" or whitespace)']),
    ("ifname too long", '[{"name":"a","lowerDevice":"abcdefghijklmnop"}]',
     [f'{C}[0].lowerDevice: "abcdefghijklmnop" is not a valid interface name (1-15 printable '
      'ASCII characters, not "." or "..", no "/", ":" or whitespace)']),
    ("bad mode", '[{"name":"a","master":"x","mode":"bridged"}]',
     [f'{C}[0].mode: unknown mode "bridged"; expected one of: bridge, passthru, private, vepa']),
    ("capacity zero", '[{"name":"a","master":"x","capacity":0}]',
     [f"{C}[0].capacity: 0 is out of range; must be between 1 and 1000"]),
    ("capacity huge", '[{"name":"a","master":"x","capacity":100000}]',
     [f"{C}[0].capacity: 100000 is out of range; must be between 1 and 1000"]),
    ("capacity string", '[{"name":"a","master":"x","capacity":"5"}]',
     [f'{C}[0].capacity: must be an integer, got "5" (a string)']),
    ("capacity bool", '[{"name":"a","master":"x","capacity":true}]',
     [f"{C}[0].capacity: must be an integer, got true (a boolean)"]),
    ("capacity float", '[{"name":"a","master":"x","capacity":1.5}]',
     [f"{C}[0].capacity: must be an integer, got 1.5 (a number)"]),
    ("passthru capacity", '[{"name":"a","master":"x","mode":"passthru","capacity":2}]',
     [f"{C}[0].capacity: must be 1 in passthru mode (one macvtap owns the lower link), got 2"]),
    ("passthru shared", '[{"name":"a","master":"x","mode":"passthru"},{"name":"b","master":"x"}]',
     [f'{C}[0].mode: passthru needs lower link "x" to itself, but {C}[1] uses it too']),
    ("duplicate names", '[{"name":"a","master":"x"},{"name":"b","master":"y"},'
                        '{"name":"a","master":"z"}]',
     [f'{C}[2].name: duplicate name "a" (also {C}[0])']),
    ("every problem at once", '[{"name":"a b","master":"x","mode":"m"},{"capacity":-1}]',
     [f'{C}[0].name: "a b" is not a valid resource name: use letters, digits, "-", "_" or ".", '
      "starting and ending with a letter or digit",
      f'{C}[0].mode: unknown mode "m"; expected one of: bridge, passthru, private, vepa',
      f"{C}[1].name: is required",
      f'{C}[1].master: is required (or its alias "lowerDevice")',
      f"{C}[1].capacity: -1 is out of range; must be between 1 and 1000"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "want"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_configuration(text: str, want: list[Resource]) -> None:
    conf = config.parse(text)
    assert list(conf.resources) == want
    assert not conf.discovery


@pytest.mark.parametrize(("text", "problems"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_configuration(text: str, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(text)
    assert caught.value.problems == problems


@pytest.mark.parametrize("text", [None, "[]", " [ ] "])
def test_unset_or_empty_means_discovery(text: str | None) -> None:
    conf = config.parse(text)
    assert conf.discovery and conf.resources == ()


@pytest.mark.parametrize("text", ["", "  \n"])
def test_blank_is_refused_rather_than_offering_every_nic(text: str) -> None:
    with pytest.raises(ConfigError, match="is blank; unset it, or write \\[\\] for discovery"):
        config.parse(text)


def test_deep_nesting_is_one_line_not_a_recursion_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse("[" * 100_000 + "]" * 100_000)
    assert caught.value.problems == [
        f"{C}: invalid configuration: nested deeper than {config.MAX_DEPTH} levels"
    ]
    # brackets inside strings do not count
    assert config.parse('[{"name":"a","master":"x", "mode": null}]'.replace("null", '"bridge"'))
    with pytest.raises(ConfigError, match="unknown mode"):
        config.parse(json.dumps([{"name": "a", "master": "x", "mode": "[" * 50}]))


def test_too_many_resources_are_refused() -> None:
    many = [{"name": f"r{i}", "master": f"e{i}"} for i in range(config.MAX_RESOURCES + 1)]
    with pytest.raises(ConfigError) as caught:
        config.parse(json.dumps(many))
    assert caught.value.problems == [
        f"{C}: {config.MAX_RESOURCES + 1} resources; "
        f"at most {config.MAX_RESOURCES} (one process each)"
    ]
    assert len(config.parse(json.dumps(many[:-1])).resources) == config.MAX_RESOURCES


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: os.mkfifo(p), "not a regular file (a FIFO)"),
        (lambda p: os.symlink("/dev/zero", p), "not a regular file (a character device)"),
        (lambda p: os.mkdir(p), "not a regular file (a directory)"),
        (
            lambda p: p.write_bytes(b" " * (config.MAX_BYTES + 1)),
            f"larger than {config.MAX_BYTES} bytes",
        ),
        (
            lambda p: p.write_bytes(b"\xff\xfe"),
            "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
    ],
)
def test_only_regular_files_of_bounded_size_are_read(
    tmp_path: Path, make: Callable[[Path], object], why: str
) -> None:
    """A FIFO would hang the reader, /dev/zero would exhaust it: both are one line."""
    path = tmp_path / "conf"
    make(path)
    with pytest.raises(ConfigError) as caught:
        config.load({}, file=str(path))
    assert caught.value.problems == [f"{path}: cannot read configuration file: {why}"]


def test_resource_names_and_devices() -> None:
    res = config.parse('[{"name":"eth0","master":"eth0","capacity":2}]').resources[0]
    assert res.resource_name == "macvtap.network.kubevirt.io/eth0"
    assert res.device_ids() == ["eth0Mvp0", "eth0Mvp1"]


def test_load_prefers_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf.json"
    path.write_text('[{"name":"f","master":"eth1"}]')
    env = {config.ENV_VAR: '[{"name":"e","master":"eth0"}]'}
    assert config.load(env).resources[0].name == "e"
    assert config.load(env, file=str(path)).resources[0].name == "f"
    assert config.load({**env, config.ENV_FILE_VAR: str(path)}).source == str(path)


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf.json"
    path.write_text('[{"name":"f"}]')
    with pytest.raises(ConfigError) as caught:
        config.load({}, file=str(path))
    assert caught.value.problems == [f'{path}[0].master: is required (or its alias "lowerDevice")']
    with pytest.raises(ConfigError) as caught:
        config.load({}, file=str(tmp_path / "missing.json"))
    assert caught.value.problems == [
        f"{tmp_path / 'missing.json'}: cannot read configuration file: No such file or directory"
    ]


def test_single_resource_from_options() -> None:
    assert config.resource({"name": "a", "master": "x"}, "serve") == Resource("a", "x")
    with pytest.raises(ConfigError) as caught:
        config.resource({"name": "a", "master": "x", "capacity": 0}, "serve")
    assert caught.value.problems == [
        "serve.capacity: 0 is out of range; must be between 1 and 1000"
    ]
