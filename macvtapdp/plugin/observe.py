"""What a resource process reports about itself as it happens: one interface, many listeners.

The servicer, the kubelet lifecycle, the link watcher and the sweep call these
methods; the metrics (``plugin.metrics``) implement them. ``Quiet`` is the
listener that does nothing (metrics off), so no caller checks for ``None``.
Calls must be cheap and must not block: they happen on the serving path.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def allocated(self, result: str, seconds: float, count: int = 1) -> None:
        """``count`` devices of one Allocate: ``created``, ``reused`` or ``failed``."""

    def registered(self) -> None:
        """A registration with the kubelet succeeded."""

    def health(self, healthy: bool, capacity: int, lower_up: bool) -> None:
        """The devices' health, as every ListAndWatch stream now reports it."""

    def swept(self, count: int = 1) -> None:
        """Leaked macvtaps deleted by the sweep."""


class Quiet:
    """An Observer that ignores everything."""

    def allocated(self, result: str, seconds: float, count: int = 1) -> None:
        pass

    def registered(self) -> None:
        pass

    def health(self, healthy: bool, capacity: int, lower_up: bool) -> None:
        pass

    def swept(self, count: int = 1) -> None:
        pass
