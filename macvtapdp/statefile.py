"""What a resource process reports about itself, for ``macvtapdp status``.

The kubelet cannot be asked whether a plugin is registered, so each resource
process writes a small JSON file (atomically) whenever its registration, its
lower link or its sweep changes. It lives in the run directory, never in the
device-plugin directory: kubelets have deleted every file there on start.

Serving never depends on this file: a full disk or a broken run directory
costs ``status`` its details (one warning in the log), never a resource.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

from macvtapdp import files

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024


class StateFile:
    """Keeps ``path`` up to date with the latest fields; a no-op without a path."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fields: dict[str, Any] = {"pid": os.getpid()}
        self._lock = threading.Lock()
        self._failing = False

    def update(self, **fields: Any) -> None:
        if self.path is None:
            return
        with self._lock:
            self._fields.update(fields, updated=time.time())
            try:
                files.write_atomically(self.path, json.dumps(self._fields))
            except OSError as err:
                if not self._failing:
                    log.warning("cannot write %s (%s): status will lack details", self.path, err)
                self._failing = True
                return
            if self._failing:
                log.info("%s is written again", self.path)
            self._failing = False

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def read(path: str) -> dict[str, Any]:
    """The fields last written to ``path``; empty if there are none."""
    try:
        data = json.loads(files.read_regular(path, MAX_BYTES))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
