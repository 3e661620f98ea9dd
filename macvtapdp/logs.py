"""One log format for every program, and logging that never blocks serving.

supervisord interleaves all programs on the container's stdout, so each line
names who wrote it: the resource, ``watchdog``, ``reconcile`` or ``metrics``.

A process that logs straight to its stdout stops when nobody reads it (the
pipe to a stopped supervisord fills after a few KiB), and with it whatever
held a lock while logging: Allocate, link health. So records go into a bounded
queue that a writer thread empties; a record that finds the queue full is
dropped and counted, and the writer reports the count once it can write again.
Text from outside (device IDs in requests) goes through ``quoted``: a newline
cannot forge a line, and a megabyte cannot flood the log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import signal
import sys
import threading
from typing import IO

QUEUE_SIZE = 1000
QUOTE_LIMIT = 64


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a JSON string, cut at ``limit`` characters (saying how many were left out)."""
    if len(text) <= limit:
        return json.dumps(text)
    return f"{json.dumps(text[:limit])}... ({len(text) - limit} more characters)"


class _DroppingHandler(logging.handlers.QueueHandler):
    """Enqueues without ever waiting; counts what did not fit."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0
        self._count_lock = threading.Lock()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1

    def take_dropped(self) -> int:
        with self._count_lock:
            dropped, self.dropped = self.dropped, 0
        return dropped


class _Writer(threading.Thread):
    """Writes queued records to ``stream``; may block on it without blocking anyone else."""

    def __init__(
        self,
        records: queue.Queue[logging.LogRecord | None],
        handler: _DroppingHandler,
        out: logging.Handler,
    ) -> None:
        super().__init__(name="log-writer", daemon=True)
        self._records = records
        self._handler = handler
        self._out = out

    def run(self) -> None:
        # SIGTERM must reach the main thread: one that blocks in a read (the watchdog's, on
        # supervisord's events) is woken only by a signal the kernel delivers to it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while (record := self._records.get()) is not None:
            dropped = self._handler.take_dropped()
            if dropped:
                self._out.handle(
                    logging.makeLogRecord(
                        {
                            "name": "macvtapdp",
                            "levelno": logging.WARNING,
                            "levelname": "WARNING",
                            "msg": f"{dropped} log lines were dropped: the log was not read",
                        }
                    )
                )
            self._out.handle(record)


def configure(tag: str, stream: IO[str] | None = None) -> None:
    """Log INFO and above as ``<time> <LEVEL> [<tag>] <message>``, without ever blocking."""
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{tag}] %(message)s"))
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_SIZE)
    handler = _DroppingHandler(records)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _Writer(records, handler, out).start()


def flush(timeout: float = 1.0) -> None:
    """Give the writer up to ``timeout`` to write what is queued (before exiting)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, _DroppingHandler):
            q = h.queue
            deadline = threading.Event()
            waited = 0.0
            while not q.empty() and waited < timeout:  # type: ignore[attr-defined]
                deadline.wait(0.01)
                waited += 0.01
