"""One log format for every program supervisord runs.

supervisord interleaves all programs on the container's stdout, so each line
names who wrote it: the resource, ``watchdog`` or ``reconcile``.
"""

from __future__ import annotations

import logging


def configure(tag: str) -> None:
    """Log INFO and above to stderr as ``<time> <LEVEL> [<tag>] <message>``."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{tag}] %(message)s",
        force=True,
    )
