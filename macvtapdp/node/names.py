"""supervisord's program names: ``resource-<name>`` per resource, and the helpers.

Kept apart from ``render`` (which imports the settings and the configuration):
``status`` and the metrics endpoint map programs to resources with nothing else.
"""

from __future__ import annotations

PROGRAM_PREFIX = "resource-"
WATCHDOG = "watchdog"
RECONCILE = "reconcile"
METRICS = "metrics"


def program_name(resource: str) -> str:
    """supervisord's name for a resource's program (no ``/``, ``:`` or spaces)."""
    return PROGRAM_PREFIX + resource


def resource_of(program: str) -> str | None:
    """The resource a program serves, or None for other programs."""
    return program[len(PROGRAM_PREFIX) :] if program.startswith(PROGRAM_PREFIX) else None
