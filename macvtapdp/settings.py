"""Every setting, defined once: its flag, environment variable, default and help.

``run`` (the typer CLI) resolves options, environment and defaults into a
``Node``; the programs supervisord starts get their settings as an explicit
command line rendered from these dataclasses by ``to_argv`` and read back by
``from_argv``, so ``ps`` shows each program's whole configuration and nothing
is parsed twice by hand. Those programs import this module, not typer.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from macvtapdp import config, naming, rundir
from macvtapdp.config import DEFAULT_CAPACITY, Mode, Resource
from macvtapdp.errors import PermanentError


@dataclass(frozen=True)
class Setting:
    """How a person gives one setting: a flag, maybe an environment variable, a help text."""

    flag: str
    env: str | None
    help: str
    metavar: str | None = None


DEFAULT_RUN_DIR = rundir.DEFAULT_RUN_DIR
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_SWEEP_GRACE = 300.0
DEFAULT_DISCOVER_GRACE = 5.0
DEFAULT_METRICS_PORT = 9469
DEFAULT_METRICS_ADDRESS = f"0.0.0.0:{DEFAULT_METRICS_PORT}"

PLUGIN_DIR = Setting(
    "--plugin-dir",
    naming.PLUGIN_DIR_VAR,
    "The kubelet's device-plugin directory (kubelet.sock and the plugin sockets).",
    "DIR",
)
RUN_DIR = Setting(  # flag, variable and default live in rundir, with the layout
    rundir.RUN_DIR_FLAG,
    rundir.RUN_DIR_VAR,
    "Where supervisord's config, control socket, state and metrics files live.",
    "DIR",
)
CONFIG_FILE = Setting(
    "--config-file",
    "DP_MACVTAP_CONF_FILE",
    "Read the configuration from this file instead of $DP_MACVTAP_CONF, and follow its changes.",
    "FILE",
)
DISCOVER_INCLUDE = Setting(
    "--discover-include",
    "MACVTAPDP_DISCOVER_INCLUDE",
    "Discovery: offer only links whose name matches one of these globs "
    "(repeat the option, or separate with commas).",
    "GLOB",
)
DISCOVER_EXCLUDE = Setting(
    "--discover-exclude",
    "MACVTAPDP_DISCOVER_EXCLUDE",
    "Discovery: never offer links whose name matches one of these globs.",
    "GLOB",
)
DISCOVER_KINDS = Setting(
    "--discover-kinds",
    "MACVTAPDP_DISCOVER_KINDS",
    "Discovery: also offer links of these kinds, besides physical NICs and bonds: a link "
    "kind as `ip -d link` shows it (veth, bridge, vlan, team...) or usb, thunderbolt, "
    "wireless, virtual (no kind, no device).",
    "KIND",
)
DISCOVER_GRACE = Setting(
    "--discover-grace",
    "MACVTAPDP_DISCOVER_GRACE",
    "Discovery: keep the resource of a link that disappeared this long, so a link deleted "
    "and created again keeps its process and kubelet stream.",
    "SECONDS",
)
POD_RESOURCES_SOCKET = Setting(
    "--pod-resources-socket",
    "MACVTAPDP_POD_RESOURCES_SOCKET",
    "The kubelet's PodResources API, asked which devices pods hold (for the sweep).",
    "PATH",
)
SWEEP_GRACE = Setting(
    "--sweep-grace",
    "MACVTAPDP_SWEEP_GRACE",
    "Delete a device's macvtap once no pod has held it this long (0: never).",
    "SECONDS",
)
NO_TOPOLOGY = Setting(
    "--no-topology",
    "MACVTAPDP_NO_TOPOLOGY",
    "Do not report the lower link's NUMA node to the kubelet's Topology Manager.",
)
METRICS_ADDRESS = Setting(
    "--metrics-address",
    "MACVTAPDP_METRICS_ADDRESS",
    "Serve /metrics, /healthz and /readyz over HTTP here (HOST:PORT; empty: off).",
    "HOST:PORT",
)


@dataclass(frozen=True)
class Discovery:
    """Which links discovery mode offers, and how long a vanished one keeps its resource."""

    discover_include: tuple[str, ...] = ()
    discover_exclude: tuple[str, ...] = ()
    discover_kinds: tuple[str, ...] = ()
    discover_grace: float = DEFAULT_DISCOVER_GRACE


@dataclass(frozen=True)
class Plugin:
    """What every resource process of a node shares, besides its resource."""

    plugin_dir: str = naming.DEFAULT_PLUGIN_DIR
    run_dir: str = DEFAULT_RUN_DIR
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    sweep_grace: float = DEFAULT_SWEEP_GRACE
    topology: bool = True
    sysfs: str = "/sys"  # where taps' device numbers are read (tests: a netns's view)
    numa_sysfs: str = "/sys"  # where NUMA nodes are read (tests: a prepared tree)
    link_filter: bool = True  # the kernel-side filter on link events (the benchmark turns it off)
    metrics: bool = True


@dataclass(frozen=True)
class Serve:
    """One resource process: ``python -m macvtapdp.plugin`` + ``to_argv(Serve(...))``."""

    resource: Resource
    plugin: Plugin = field(default_factory=Plugin)


@dataclass(frozen=True)
class Node:
    """Everything ``run`` resolved: the node-side programs get all of it."""

    plugin: Plugin = field(default_factory=Plugin)
    config_file: str | None = None
    discovery: Discovery = field(default_factory=Discovery)
    metrics_address: str = DEFAULT_METRICS_ADDRESS

    def serve(self, resource: Resource) -> Serve:
        return Serve(resource=resource, plugin=self.plugin)


def check_address(text: str) -> str:
    """``HOST:PORT`` for the metrics endpoint, or "" (off); PermanentError otherwise."""
    text = text.strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise PermanentError(
            f"{METRICS_ADDRESS.flag}: {text!r} is not HOST:PORT with a port from 1 to 65535 "
            "(empty turns the endpoint off)"
        )
    if not host or any(c.isspace() for c in host):
        raise PermanentError(f"{METRICS_ADDRESS.flag}: {text!r} has no host (use 0.0.0.0:{port})")
    return text


def check_sweep_grace(seconds: float) -> float:
    """The sweep's grace: finite and not negative (0 turns the sweep off); PermanentError."""
    if not math.isfinite(seconds) or seconds < 0:
        raise PermanentError(
            f"{SWEEP_GRACE.flag}: {seconds:g} is not a number of seconds >= 0 (0: never sweep)"
        )
    return seconds


D = TypeVar("D")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _leaves(cls: type[Any]) -> list[tuple[tuple[str, ...], Any]]:
    """(path of field names, type) of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    found: list[tuple[tuple[str, ...], Any]] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found += [((f.name, *path), t) for path, t in _leaves(kind)]  # type: ignore[arg-type]
        else:
            found.append(((f.name,), kind))
    return found


def to_argv(obj: Any) -> list[str]:
    """``obj`` (a settings dataclass) as ``--name=value`` options.

    Tuples repeat their option; None leaves it out.
    """
    argv: list[str] = []
    for path, _kind in _leaves(type(obj)):
        value = obj
        for name in path:
            value = getattr(value, name)
        flag = _flag(path[-1])
        if value is None:
            continue
        if isinstance(value, tuple):
            argv += [f"{flag}={item}" for item in value]
        elif isinstance(value, bool):
            argv.append(f"{flag}={'true' if value else 'false'}")
        elif isinstance(value, enum.Enum):
            argv.append(f"{flag}={value.value}")
        elif isinstance(value, float):
            argv.append(f"{flag}={value:g}")
        else:
            argv.append(f"{flag}={value}")
    return argv


def _convert(kind: Any, values: list[str], flag: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        return tuple(values)
    if origin in (typing.Union, types.UnionType):  # X | None
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
    if len(values) != 1:
        raise ValueError(f"{flag} given {len(values)} times")
    (text,) = values
    if kind is bool:
        if text not in ("true", "false"):
            raise ValueError(f"{flag}: expected true or false, got {text!r}")
        return text == "true"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(text)
    return kind(text)


def from_argv(cls: type[D], argv: Sequence[str]) -> D:
    """Read back what ``to_argv`` wrote; PermanentError (one line) on anything else."""
    given: dict[str, list[str]] = {}
    for arg in argv:
        flag, sep, value = arg.partition("=")
        if not (flag.startswith("--") and sep):
            raise PermanentError(f"unexpected argument {arg!r}: expected --name=value")
        given.setdefault(flag, []).append(value)
    leaves = _leaves(cls)
    known = {_flag(path[-1]) for path, _ in leaves}
    unknown = sorted(set(given) - known)
    if unknown:
        raise PermanentError(f"unknown option {unknown[0]}")
    values: dict[tuple[str, ...], Any] = {}
    try:
        for path, kind in leaves:
            flag = _flag(path[-1])
            if flag in given:
                values[path] = _convert(kind, given[flag], flag)
    except ValueError as err:
        raise PermanentError(str(err)) from err
    return _build(cls, (), values)


def _build(cls: type[D], prefix: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> D:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if cls is Serve and f.name == "resource":
                kwargs[f.name] = _resource(path, values)
            else:
                kwargs[f.name] = _build(hints[f.name], path, values)
        elif path in values:
            kwargs[f.name] = values[path]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise PermanentError(f"incomplete settings for {cls.__name__}: {err}") from err


def _resource(path: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> Resource:
    """The resource, validated exactly as the configuration is."""
    fields: dict[str, Any] = {
        "name": values.get((*path, "name")),
        "master": values.get((*path, "lower")),
        "mode": (values.get((*path, "mode")) or Mode.BRIDGE).value,
        "capacity": values.get((*path, "capacity"), DEFAULT_CAPACITY),
    }
    return config.resource({k: v for k, v in fields.items() if v is not None}, "settings")


def to_json(node: Node) -> str:
    """``node`` for the run directory's ``node.json`` (``status`` reads it back)."""
    return json.dumps(to_argv(node))


def from_json(text: str) -> Node:
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise PermanentError("node settings: expected a list of options")
    return from_argv(Node, data)
