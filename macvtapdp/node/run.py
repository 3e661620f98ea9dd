"""``macvtapdp run``: validate, render supervisord's config, exec supervisord.

After the exec supervisord (``macvtapdp.node.supervise``: stock supervisord
4.3, made prompt) is the container's PID 1: it gets the pod's SIGTERM and stops
every resource. Nothing half-made on bad configuration: every problem is
reported and nothing is written or started; a run directory that cannot be
trusted, or that a live ``run`` holds, is refused before any file in it is
touched.

Two shapes. With ``DP_MACVTAP_CONF`` (the Go plugin's way) the resources are
fixed: their programs are written inline. In discovery mode, or with a
configuration file, they change while running: the resources' program files
are written into ``programs.d`` now, so they start at once, and a
``reconcile`` program keeps them up to date.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import sys
from dataclasses import dataclass
from typing import NoReturn

from macvtapdp import config, files, rundir, settings
from macvtapdp.config import Resource
from macvtapdp.errors import KernelError, PermanentError
from macvtapdp.node import discovery, programs
from macvtapdp.node.render import module_argv, render
from macvtapdp.rundir import Layout
from macvtapdp.settings import Node


@dataclass(frozen=True)
class Plan:
    """What ``run`` writes: the main config, the resources, and where they come from."""

    node: Node
    layout: Layout
    text: str
    resources: list[Resource]
    dynamic: bool
    summary: str
    warnings: list[str]


def _discover(filters: discovery.Filters, plugin_dir: str) -> tuple[list[Resource], list[str]]:
    try:
        verdicts = discovery.scan(filters, plugin_dir)
    except KernelError as err:  # reconcile tries again
        return [], [f"cannot list links: {err}"]
    found = discovery.offered(verdicts)
    notes = [
        f"link {n} is not offered: {v.reason}" for n, v in sorted(verdicts.items()) if v.notable
    ]
    return found, notes


def plan(node: Node) -> Plan:
    """Validate and render without writing anything (raises PermanentError)."""
    # Absolute paths (not realpath: a ConfigMap volume swaps the symlinks under the file's):
    # supervisord includes the program files relative to its own configuration's directory.
    node = dataclasses.replace(
        node,
        plugin=dataclasses.replace(
            node.plugin,
            plugin_dir=os.path.abspath(node.plugin.plugin_dir),
            run_dir=os.path.abspath(node.plugin.run_dir),
        ),
        config_file=None if node.config_file is None else os.path.abspath(node.config_file),
    )
    plugin_dir = node.plugin.plugin_dir
    layout = Layout(node.plugin.run_dir)
    filters = discovery.Filters.of(node.discovery)
    conf = config.load(file=node.config_file)
    dynamic = node.config_file is not None or conf.discovery
    warnings: list[str] = []
    if conf.discovery:
        resources, warnings = _discover(filters, plugin_dir)
    else:
        resources = list(conf.resources)
        config.check_fits(resources, plugin_dir)
    text = render(node, resources, layout, dynamic=dynamic)
    for r in resources if dynamic else ():  # refuse unwritable values before anything is written
        programs.text(node, r)
    names = ", ".join(r.name for r in resources) or "(none)"
    if conf.discovery:
        what = f"discovery mode ({filters.describe()}): {len(resources)} links offered: {names}"
    else:
        what = f"{len(resources)} resources from {conf.source}: {names}"
    follows = {
        (True, True): "; the reconcile program follows links and the file",
        (True, False): "; the reconcile program follows links",
        (False, True): "; the reconcile program follows the file",
    }.get((conf.discovery, node.config_file is not None), "")
    return Plan(node, layout, text, resources, dynamic, what + follows, warnings)


def missing_links(resources: list[Resource]) -> list[str]:
    """One warning per configured lower link that does not exist now."""
    from macvtapdp.linux.netlink import Netlink

    try:
        with Netlink() as netlink:
            links = netlink.links()
        present = {link.name for link in links} | {alt for link in links for alt in link.altnames}
    except KernelError as err:
        return [f"cannot list links: {err}"]
    return [
        f"resource {r.name}: lower link {r.lower} does not exist; its devices stay "
        "Unhealthy until it appears"
        for r in resources
        if r.lower not in present
    ]


def supervisord_argv() -> list[str]:
    """supervisord, through the shim that removes its one-second ticks."""
    return module_argv("macvtapdp.node.supervise")


def append_to_files(*fds: int) -> None:
    """Put ``fds`` in append mode where they are regular files (``run > file``).

    supervisord and its programs open ``/dev/stdout`` again, in append mode; a
    shell's ``>`` opens the file without it, so anything written to the inherited
    descriptor itself (supervisord's HTTP server reports errors there) would land at
    its own offset, over lines appended since. Pipes and terminals need nothing.
    """
    for fd in fds:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        except OSError:
            continue


def say(line: str) -> None:
    print(f"macvtapdp: {line}", file=sys.stderr, flush=True)


def _write(p: Plan) -> None:
    """Write what supervisord and ``status`` read; one line (PermanentError) if the disk refuses."""
    what = p.layout.programs_dir
    try:
        if p.dynamic:
            programs.write(p.layout, p.node, p.resources)
        what = p.layout.node_settings
        files.write_atomically(what, settings.to_json(p.node))
        what = p.layout.conf
        files.write_atomically(what, p.text)
    except OSError as err:  # a full or read-only run directory
        raise PermanentError(
            f"run directory {p.layout.run_dir}: cannot write {what}: {err.strerror or err}"
        ) from err


def launch(node: Node) -> NoReturn:
    """Validate and render (raising PermanentError), then become supervisord."""
    p = plan(node)
    warnings = p.warnings + ([] if p.dynamic and not p.resources else missing_links(p.resources))
    rundir.prepare(p.layout)  # the lock it returns stays open in supervisord
    append_to_files(1, 2)
    _write(p)
    say(f"{p.summary}; starting supervisord with {p.layout.conf}")
    for warning in warnings:
        say(f"warning: {warning}")
    argv = supervisord_argv()
    os.execv(argv[0], [*argv, "--nodaemon", "--configuration", p.layout.conf])
