"""What every ListAndWatch stream reports: the devices' health and NUMA nodes.

The link watcher (and the topology reader) set it; each open stream waits on
it and sends a full snapshot, as the kubelet expects, whenever it changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

KEEP: Any = object()  # Health.set: leave this part as it is


@dataclass(frozen=True)
class Snapshot:
    """All devices of a resource share their lower link, so one value describes them all."""

    healthy: bool = False
    numa_nodes: tuple[int, ...] | None = None  # None: no topology to report
    reason: str = "not checked yet"


class Health:
    """The latest Snapshot, broadcast to every waiting ListAndWatch stream."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._snapshot = Snapshot()
        self._version = 0
        self._closed = False

    def set(
        self,
        *,
        healthy: bool | None = None,
        numa_nodes: tuple[int, ...] | None = KEEP,
        reason: str | None = None,
    ) -> None:
        """Change part of the snapshot; streams wake when health or NUMA nodes change."""
        with self._cond:
            old = self._snapshot
            new = Snapshot(
                healthy=old.healthy if healthy is None else healthy,
                numa_nodes=old.numa_nodes if numa_nodes is KEEP else numa_nodes,
                reason=old.reason if reason is None else reason,
            )
            self._snapshot = new
            if (new.healthy, new.numa_nodes) != (old.healthy, old.numa_nodes):
                self._version += 1
                self._cond.notify_all()

    def get(self) -> tuple[int, Snapshot]:
        with self._cond:
            return self._version, self._snapshot

    def wait(self, version: int, active: threading.Event) -> tuple[int, Snapshot] | None:
        """Block until the snapshot differs from ``version``; None once closed or inactive."""
        with self._cond:
            while self._version == version and not self._closed and active.is_set():
                self._cond.wait()
            if self._closed or not active.is_set():
                return None
            return self._version, self._snapshot

    def wake(self) -> None:
        """Make every waiting stream re-check whether it is still active."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """End every stream (shutdown): they return, and the kubelet sees the end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
