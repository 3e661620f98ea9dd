"""Names that other programs depend on: keep every one of them exactly as it is.

- Resource names are ``macvtap.network.kubevirt.io/<name>``, as in the Go plugin.
- Device IDs are ``<name>Mvp<i>``: the kubelet's checkpoint stores them, so a node
  can switch between the Go plugin and this one only if they agree.
- Interface names are what the macvtap CNI derives from the device ID
  (kubevirt/macvtap-cni ``TemporaryInterfaceName``): ``mvt`` and the low 48 bits
  of xxHash64 (seed 0) of the ID as 12 lower-case hex digits, 15 characters,
  the Linux limit. The CNI finds the interface by this name.
- Plugin socket names start with the Go plugin's ``macvtap.network.kubevirt.io_<name>``
  (probes glob on it); ``@<token>.sock`` makes each start's socket unique, and
  ``@`` cannot occur in a resource name, so one resource's sockets never match
  another's pattern.
"""

from __future__ import annotations

import os
import re

import xxhash

DOMAIN = "macvtap.network.kubevirt.io"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
PLUGIN_DIR_VAR = "MACVTAPDP_PLUGIN_DIR"
# gRPC's unix listener needs the path and a NUL in sockaddr_un.sun_path[108].
MAX_SOCKET_PATH = 107
_TOKEN_HEX_DIGITS = 6


def resource_name(name: str) -> str:
    """The extended resource the kubelet advertises for resource ``name``."""
    return f"{DOMAIN}/{name}"


def device_id(name: str, index: int) -> str:
    """The ID of device ``index`` of resource ``name`` (the Go plugin's scheme)."""
    return f"{name}Mvp{index}"


def device_ids(name: str, capacity: int) -> list[str]:
    """All device IDs of resource ``name``, in order."""
    return [device_id(name, i) for i in range(capacity)]


def interface_name(dev_id: str) -> str:
    """The macvtap interface name the macvtap CNI expects for ``dev_id``."""
    digest = xxhash.xxh64_intdigest(dev_id.encode(), seed=0)
    return f"mvt{digest & 0xFFFF_FFFF_FFFF:012x}"


def socket_prefix(name: str) -> str:
    """What every socket of resource ``name`` starts with (the Go plugin's full name)."""
    return f"{DOMAIN}_{name}"


def socket_name(name: str, token: str | None = None) -> str:
    """A fresh socket file name for one start of resource ``name``'s server."""
    if token is None:
        token = os.urandom(_TOKEN_HEX_DIGITS // 2).hex()
    return f"{socket_prefix(name)}@{token}.sock"


def is_own_socket(name: str, filename: str) -> bool:
    """True for sockets of resource ``name``: ours from any start, or the Go plugin's."""
    token = f"@[0-9a-f]{{{_TOKEN_HEX_DIGITS}}}"
    pattern = re.escape(socket_prefix(name)) + rf"({token}\.sock)?"
    return re.fullmatch(pattern, filename) is not None


def max_name_length(plugin_dir: str = DEFAULT_PLUGIN_DIR) -> int:
    """The longest resource name whose socket path fits ``MAX_SOCKET_PATH``."""
    overhead = len(plugin_dir.rstrip("/")) + 1 + len(socket_name("", "0" * _TOKEN_HEX_DIGITS))
    return MAX_SOCKET_PATH - overhead
