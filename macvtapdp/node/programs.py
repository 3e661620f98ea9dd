"""Resource programs as files: what ``run`` and ``reconcile`` share.

In discovery mode and with a configuration file, supervisord includes
``<run_dir>/programs.d/*.conf``, one file per resource:
``resource-<name>.conf``, holding the program section ``render_program`` makes.
``run`` writes the first set before it execs supervisord (so resources start at
once); ``reconcile`` rewrites the set and has supervisord apply it.

A file is a pure function of the resource and the node's settings: an
unchanged resource gets a byte-identical file,
supervisord sees an unchanged program, and its process, socket and kubelet
stream stay as they are. Each file starts with a comment holding the resource
as JSON, so the settings in force can be read back (for log lines such as
"mode bridge -> vepa") even by a reconcile process that just started.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from macvtapdp.config import Mode, Resource
from macvtapdp.files import read_regular, write_atomically
from macvtapdp.node.names import PROGRAM_PREFIX, program_name
from macvtapdp.node.render import render_program
from macvtapdp.rundir import Layout
from macvtapdp.settings import Node

SUFFIX = ".conf"
HEADER = "; macvtapdp resource "
_MAX_BYTES = 64 * 1024


def file_name(name: str) -> str:
    """The program file of resource ``name``."""
    return program_name(name) + SUFFIX


def _name(entry: str) -> str:
    """The resource whose program file ``entry`` is (see ``_ours``)."""
    return entry[len(PROGRAM_PREFIX) : -len(SUFFIX)]


def text(node: Node, resource: Resource) -> str:
    """The content of ``resource``'s program file (deterministic)."""
    fields = {
        "name": resource.name,
        "lower": resource.lower,
        "mode": resource.mode.value,
        "capacity": resource.capacity,
    }
    header = HEADER + json.dumps(fields, sort_keys=True) + "\n"
    return header + render_program(node, resource)


def _resource_of(content: str) -> Resource | None:
    first = content.split("\n", 1)[0]
    if not first.startswith(HEADER):
        return None
    try:
        fields = json.loads(first[len(HEADER) :])
        return Resource(
            name=str(fields["name"]),
            lower=str(fields["lower"]),
            mode=Mode(fields["mode"]),
            capacity=int(fields["capacity"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _ours(entry: str) -> bool:
    return entry.startswith(PROGRAM_PREFIX) and entry.endswith(SUFFIX)


def current(layout: Layout) -> dict[str, Resource | None]:
    """The resources whose program files exist now (None: a file we cannot read back)."""
    found: dict[str, Resource | None] = {}
    try:
        entries = sorted(os.listdir(layout.programs_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not _ours(entry):
            continue
        name = _name(entry)
        try:
            content = read_regular(os.path.join(layout.programs_dir, entry), _MAX_BYTES)
        except (OSError, ValueError):
            found[name] = None
            continue
        res = _resource_of(content)
        found[name] = res if res is not None and res.name == name else None
    return found


@dataclass(frozen=True)
class Written:
    """What ``write`` changed on disk (names of resources)."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


def write(layout: Layout, node: Node, resources: Iterable[Resource]) -> Written:
    """Make ``programs_dir`` hold exactly the program files of ``resources``.

    Files whose content is already right are not touched; every other file of
    ours (``resource-*``, including leftovers of an interrupted write) goes.
    Raises RenderError, before changing anything, if a value cannot be written.
    """
    wanted = {file_name(r.name): text(node, r) for r in resources}
    os.makedirs(layout.programs_dir, mode=0o700, exist_ok=True)
    created: list[str] = []
    updated: list[str] = []
    deleted: list[str] = []
    for entry, content in sorted(wanted.items()):
        path = os.path.join(layout.programs_dir, entry)
        try:
            old: str | None = read_regular(path, _MAX_BYTES)
        except (OSError, ValueError):
            old = None
        if old == content:
            continue
        write_atomically(path, content)
        name = _name(entry)
        (created if old is None else updated).append(name)
    for entry in sorted(os.listdir(layout.programs_dir)):
        if entry.startswith(PROGRAM_PREFIX) and entry not in wanted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(layout.programs_dir, entry))
            if _ours(entry):
                deleted.append(_name(entry))
    return Written(tuple(created), tuple(updated), tuple(deleted))
