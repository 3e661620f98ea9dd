"""Parse and validate the resource configuration (``DP_MACVTAP_CONF``).

The format is the Go plugin's: a JSON array with one object per resource,
``{"name", "master" | "lowerDevice", "mode", "capacity"}``. Unset or ``[]``
means discovery mode; a blank value is refused (it is a ConfigMap gone wrong,
not a wish to offer every NIC). Every problem is collected and reported at
once, one line each, naming the element and the field, so an operator fixes a
ConfigMap in one round trip. Inside the code the lower link is ``lower``: the
JSON key ``master`` stays for the Go plugin's users. A configuration is at most
``MAX_BYTES`` long, nested at most ``MAX_DEPTH`` deep and has at most
``MAX_RESOURCES`` resources; a file must be a regular file (a FIFO or
``/dev/zero`` would hang or exhaust the reader). Nothing here imports grpc or
netlink code: the renderer and ``run`` use this module before anything heavy
is loaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from macvtapdp import files, naming
from macvtapdp.errors import ConfigError

ENV_VAR = "DP_MACVTAP_CONF"
ENV_FILE_VAR = "DP_MACVTAP_CONF_FILE"
DEFAULT_CAPACITY = 100
MAX_CAPACITY = 1000
MAX_RESOURCES = 64  # one process each: see the README's memory sizing
MAX_BYTES = 1 << 20
MAX_DEPTH = 16
IFNAMSIZ = 16  # the kernel's limit, including the terminating NUL

_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_KEYS = ("name", "master", "lowerDevice", "mode", "capacity")


class Mode(StrEnum):
    """macvtap modes (``IFLA_MACVLAN_MODE``); ``passthru`` takes the whole lower link."""

    BRIDGE = "bridge"
    VEPA = "vepa"
    PRIVATE = "private"
    PASSTHRU = "passthru"


@dataclass(frozen=True)
class Resource:
    """One resource: ``capacity`` macvtaps on lower link ``lower`` in ``mode``."""

    name: str
    lower: str
    mode: Mode = Mode.BRIDGE
    capacity: int = DEFAULT_CAPACITY

    @property
    def resource_name(self) -> str:
        return naming.resource_name(self.name)

    def device_ids(self) -> list[str]:
        return naming.device_ids(self.name, self.capacity)


@dataclass(frozen=True)
class Config:
    """A validated configuration: explicit resources, or discovery mode."""

    resources: tuple[Resource, ...] = ()
    source: str = ENV_VAR
    discovery: bool = field(default=False)

    def get(self, name: str) -> Resource | None:
        return next((r for r in self.resources if r.name == name), None)


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a resource name, or None if it can."""
    limit = naming.max_name_length()
    if not _NAME_RE.fullmatch(value):
        return (
            f"{json.dumps(value)} is not a valid resource name: use letters, digits, "
            '"-", "_" or ".", starting and ending with a letter or digit'
        )
    if len(value) > limit:
        return (
            f"{json.dumps(value)} is too long ({len(value)} characters, at most {limit}, "
            "so that its socket path fits the 107-byte unix socket limit)"
        )
    return None


def ifname_problem(value: str) -> str | None:
    """Why ``value`` cannot be a Linux interface name, or None if it can.

    The kernel also accepts non-ASCII bytes and ``%``; we keep to printable
    ASCII so every name can be written into supervisord's config and ``ps``
    output unambiguously.
    """
    rule = '1-15 printable ASCII characters, not "." or "..", no "/", ":" or whitespace'
    valid = (
        0 < len(value.encode()) < IFNAMSIZ
        and value not in (".", "..")
        and all(33 <= ord(c) < 127 and c not in "/:" for c in value)
    )
    return None if valid else f"{json.dumps(value)} is not a valid interface name ({rule})"


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {json.dumps(key)}")
        seen[key] = value
    return seen


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}
    kind = "null" if value is None else kinds.get(type(value), f"an {type(value).__name__}")
    if isinstance(value, list):
        kind = "an array"
    elif isinstance(value, dict):
        kind = "an object"
    return f"{json.dumps(value)} ({kind})" if isinstance(value, str | int | float) else kind


def _element(where: str, item: Any, problems: list[str]) -> Resource | None:
    if not isinstance(item, dict):
        problems.append(f"{where}: must be an object, got {_describe(item)}")
        return None
    before = len(problems)
    for key in sorted(set(item) - set(_KEYS)):
        problems.append(
            f"{where}: unknown key {json.dumps(key)}; expected one of: " + ", ".join(_KEYS)
        )

    def text(key: str) -> str | None:
        value = item.get(key)
        if value is None or isinstance(value, str):
            return value
        problems.append(f"{where}.{key}: must be a string, got {_describe(value)}")
        return None

    name = text("name")
    if "name" not in item:
        problems.append(f"{where}.name: is required")
    elif name is not None and (why := name_problem(name)):
        problems.append(f"{where}.name: {why}")

    master, lower = text("master"), text("lowerDevice")
    if "master" in item and "lowerDevice" in item:
        problems.append(f'{where}: give "master" or its alias "lowerDevice", not both')
    elif "master" not in item and "lowerDevice" not in item:
        problems.append(f'{where}.master: is required (or its alias "lowerDevice")')
    key = "master" if "master" in item else "lowerDevice"
    link = master if "master" in item else lower
    if link is not None and (why := ifname_problem(link)):
        problems.append(f"{where}.{key}: {why}")

    mode_text = text("mode")
    mode = Mode.BRIDGE
    if mode_text:  # absent, null or "" mean the default, as in the Go plugin
        try:
            mode = Mode(mode_text)
        except ValueError:
            allowed = ", ".join(sorted(m.value for m in Mode))
            problems.append(
                f"{where}.mode: unknown mode {json.dumps(mode_text)}; expected one of: {allowed}"
            )

    capacity = 1 if mode is Mode.PASSTHRU else DEFAULT_CAPACITY
    raw = item.get("capacity")
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int):
            problems.append(f"{where}.capacity: must be an integer, got {_describe(raw)}")
        elif not 1 <= raw <= MAX_CAPACITY:
            problems.append(
                f"{where}.capacity: {raw} is out of range; must be between 1 and {MAX_CAPACITY}"
            )
        elif mode is Mode.PASSTHRU and raw != 1:
            problems.append(
                f"{where}.capacity: must be 1 in passthru mode (one macvtap owns the "
                f"lower link), got {raw}"
            )
        else:
            capacity = raw

    if len(problems) > before or name is None or link is None:
        return None
    return Resource(name=name, lower=link, mode=mode, capacity=capacity)


def resource(fields: Mapping[str, Any], where: str) -> Resource:
    """Validate one resource given field by field (``serve``'s options)."""
    problems: list[str] = []
    res = _element(where, dict(fields), problems)
    if res is None:
        raise ConfigError(problems)
    return res


def _depth_problem(text: str) -> str | None:
    """Why ``text`` nests too deeply to parse (json recurses per level), if it does."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
        elif char in "]}":
            depth -= 1
    return None


def parse(text: str | None, source: str = ENV_VAR) -> Config:
    """Validate configuration ``text``; raise ConfigError listing every problem."""
    if text is None:
        return Config(source=source, discovery=True)
    if not text.strip():
        raise ConfigError(
            [f"{source}: is blank; unset it, or write [] for discovery mode (one resource per NIC)"]
        )
    if len(text) > MAX_BYTES:
        raise ConfigError([f"{source}: is {len(text)} bytes long; at most {MAX_BYTES} allowed"])
    if why := _depth_problem(text):
        raise ConfigError([f"{source}: invalid configuration: {why}"])
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ConfigError(
            [f"{source}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})"]
        ) from err
    except ValueError as err:
        raise ConfigError([f"{source}: invalid JSON: {err}"]) from err
    if not isinstance(data, list):
        raise ConfigError([f"{source}: must be a JSON array of resources, got {_describe(data)}"])
    if not data:
        return Config(source=source, discovery=True)
    if len(data) > MAX_RESOURCES:
        raise ConfigError(
            [f"{source}: {len(data)} resources; at most {MAX_RESOURCES} (one process each)"]
        )

    problems: list[str] = []
    resources = [_element(f"{source}[{i}]", item, problems) for i, item in enumerate(data)]
    first_index: dict[str, int] = {}
    for i, res in enumerate(resources):
        if res is None:
            continue
        if res.name in first_index:
            problems.append(
                f"{source}[{i}].name: duplicate name {json.dumps(res.name)} "
                f"(also {source}[{first_index[res.name]}])"
            )
        else:
            first_index[res.name] = i
    for i, res in enumerate(resources):
        if res is None or res.mode is not Mode.PASSTHRU:
            continue
        others = [j for j, o in enumerate(resources) if o and j != i and o.lower == res.lower]
        if others:
            problems.append(
                f"{source}[{i}].mode: passthru needs lower link {json.dumps(res.lower)} "
                f"to itself, but {source}[{others[0]}] uses it too"
            )
    if problems:
        raise ConfigError(problems)
    return Config(resources=tuple(r for r in resources if r), source=source)


def check_fits(resources: Sequence[Resource], plugin_dir: str) -> None:
    """Refuse (ConfigError) names whose socket path would not fit under ``plugin_dir``.

    ``parse`` checks against the default directory only; ``run`` and the
    reconciler know the actual one, and a name past it could never be served.
    """
    limit = naming.max_name_length(plugin_dir)
    problems = [
        f"resource {r.name!r}: the name is too long for plugin directory {plugin_dir} "
        f"({len(r.name)} characters, at most {max(limit, 0)}: its socket path would exceed "
        f"{naming.MAX_SOCKET_PATH} bytes)"
        for r in resources
        if len(r.name) > limit
    ]
    if problems:
        raise ConfigError(problems)


def load(env: Mapping[str, str] | None = None, file: str | None = None) -> Config:
    """Read the configuration from ``file`` if given, else from the environment.

    The file may also be named by ``DP_MACVTAP_CONF_FILE``; without one,
    ``DP_MACVTAP_CONF`` is read, as the Go plugin does.
    """
    env = os.environ if env is None else env
    path = file or env.get(ENV_FILE_VAR) or None
    if path is None:
        return parse(env.get(ENV_VAR), ENV_VAR)
    try:
        text = files.read_regular(path, MAX_BYTES)
    except files.NotRegular as err:
        raise ConfigError([f"{path}: cannot read configuration file: {err}"]) from err
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError([f"{path}: cannot read configuration file: {reason}"]) from err
    return parse(text, path)
