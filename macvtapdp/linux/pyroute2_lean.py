"""Import pyroute2's rtnetlink client without the rest of pyroute2.

``import pyroute2`` runs a package ``__init__`` that imports every client the
library has (NDB, IPDB, nftables, conntrack, wireguard, nl80211, plan9...):
about 70 modules that a resource process never uses, and every resource
process would pay for them (the README has the measured cost). Importing any
submodule runs that ``__init__`` first.

So the package is registered as a namespace whose ``__init__`` has not run yet,
and only ``pyroute2.iproute.linux`` is loaded. Anything else asking for
``pyroute2.<name>`` later (a test, a debugging session) triggers the real
``__init__`` through the module ``__getattr__``, and then sees the whole library.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any


def _register_package() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed")
    package = types.ModuleType("pyroute2")
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    loader = spec.loader

    def complete(name: str) -> Any:
        """A submodule, or else (a top-level name) run the real ``__init__`` and answer."""
        if not name.startswith("__") and importlib.util.find_spec(f"pyroute2.{name}"):
            return importlib.import_module(f"pyroute2.{name}")
        del package.__getattr__
        loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package


def rtnl() -> tuple[type[Any], type[Exception]]:
    """pyroute2's ``AsyncIPRoute`` and ``NetlinkError`` classes, loaded lean."""
    _register_package()
    from pyroute2.iproute.linux import AsyncIPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    return AsyncIPRoute, NetlinkError


def ifinfmsg() -> type[Any]:
    """pyroute2's RTM_*LINK message class (already loaded with the rtnetlink client)."""
    _register_package()
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg as message  # type: ignore[import-untyped]

    return message  # type: ignore[no-any-return]
