"""Have supervisord run the program files on disk, as ``supervisorctl update`` would, but promptly.

``reloadConfig()`` names the groups added, changed and removed. Only
``resource-*`` groups are touched. Added groups are added first (they start at
once, behind nothing); removed and changed ones are all sent SIGTERM at once
(``stopProcessGroup(wait=False)``) and polled until stopped, then removed, and
the changed ones added again with their new settings. supervisorctl's
``stopProcessGroup(wait=True)`` would get its delayed reply only at
supervisord's next one-second poll, once per group, one after another.
An unchanged resource's program is byte-identical, so supervisord reports it
unchanged and its process, socket and kubelet stream are left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from macvtapdp.config import Resource
from macvtapdp.errors import Refused, Unreachable
from macvtapdp.node.control import ALREADY_ADDED, BAD_NAME, NOT_RUNNING, Control
from macvtapdp.node.names import resource_of
from macvtapdp.node.render import STOP_WAIT_SECONDS

POLL = 0.01
STOP_TIMEOUT = STOP_WAIT_SECONDS + 5.0  # supervisord SIGKILLs after STOP_WAIT_SECONDS
_ACTIVE = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})


def describe(res: Resource) -> str:
    return f"lower link {res.lower}, mode {res.mode.value}, {res.capacity} devices"


def difference(old: Resource | None, new: Resource | None) -> str:
    """``mode bridge -> vepa, capacity 100 -> 10``; empty if unknown or equal."""
    if old is None or new is None:
        return ""
    changes = [
        f"{label} {a} -> {b}"
        for label, a, b in (
            ("lower link", old.lower, new.lower),
            ("mode", old.mode.value, new.mode.value),
            ("capacity", old.capacity, new.capacity),
        )
        if a != b
    ]
    return ", ".join(changes)


def _tolerate(supervisor: Control, method: str, *args: object, ok: Sequence[int]) -> None:
    try:
        supervisor.call(method, *args)
    except Refused as fault:
        if fault.code not in ok:
            raise


def _wait_stopped(
    supervisor: Control,
    groups: Sequence[str],
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> None:
    deadline = clock() + STOP_TIMEOUT
    wanted = set(groups)
    while True:
        active = [
            p["name"]
            for p in supervisor.processes()
            if p["group"] in wanted and p["statename"] in _ACTIVE
        ]
        if not active:
            return
        if clock() > deadline:
            raise Unreachable(f"programs did not stop within {STOP_TIMEOUT:g} s: {active}")
        sleep(POLL)


def apply(
    supervisor: Control,
    before: Mapping[str, Resource | None],
    after: Mapping[str, Resource],
    reasons: Mapping[str, str] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Apply the program files now on disk; the log lines of what was done.

    ``before`` and ``after`` only feed the log lines. Raises Unreachable or
    Refused if supervisord cannot be reached or refuses; a later call finishes
    the job (``reloadConfig`` compares with what is running).
    """
    reasons = reasons or {}
    [[added, changed, removed]] = supervisor.call("reloadConfig")

    def ours(groups: Sequence[str]) -> list[str]:
        return sorted(g for g in groups if resource_of(g) is not None)

    added, changed, removed = ours(added), ours(changed), ours(removed)
    done: list[str] = []
    for group in added:
        _tolerate(supervisor, "addProcessGroup", group, ok=[ALREADY_ADDED])
        name = str(resource_of(group))
        new = after.get(name)
        done.append(f"added resource {name}" + (f": {describe(new)}" if new else ""))
    stopping = [*removed, *changed]
    for group in stopping:
        _tolerate(supervisor, "stopProcessGroup", group, False, ok=[BAD_NAME, NOT_RUNNING])
    if stopping:
        _wait_stopped(supervisor, stopping, clock, sleep)
    for group in removed:
        _tolerate(supervisor, "removeProcessGroup", group, ok=[BAD_NAME])
        name = str(resource_of(group))
        why = reasons.get(name)
        done.append(f"removed resource {name}" + (f" ({why})" if why else ""))
    for group in changed:
        _tolerate(supervisor, "removeProcessGroup", group, ok=[BAD_NAME])
        _tolerate(supervisor, "addProcessGroup", group, ok=[ALREADY_ADDED])
        name = str(resource_of(group))
        diff = difference(before.get(name), after.get(name))
        done.append(f"restarted resource {name}" + (f": {diff}" if diff else ""))
    return done
