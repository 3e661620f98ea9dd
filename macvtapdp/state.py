"""What a serve process reports about itself, for ``macvtapdp status``.

The kubelet cannot be asked whether a plugin is registered, so each serve
process writes a small JSON file (atomically) whenever its registration or its
lower link changes. It lives in the run directory, never in the device-plugin
directory: kubelets have deleted every file there on start.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any

from macvtapdp.atomic import write_atomically


class StateFile:
    """Keeps ``path`` up to date with the latest fields; a no-op without a path."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fields: dict[str, Any] = {"pid": os.getpid()}
        self._lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        if self.path is None:
            return
        with self._lock:
            self._fields.update(fields, updated=time.time())
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            write_atomically(self.path, json.dumps(self._fields))

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def read(path: str) -> dict[str, Any]:
    """The fields last written to ``path``; empty if there are none."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
