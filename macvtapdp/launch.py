"""``macvtapdp run``: validate, render supervisord's config, exec supervisord.

After the exec supervisord (``macvtapdp.supervise``: stock supervisord 4.3,
made prompt) is the container's PID 1: it gets the pod's SIGTERM and stops
every resource. Nothing half-made on bad configuration: every
problem is reported and nothing is written or started.

Two shapes. With ``DP_MACVTAP_CONF`` (the Go plugin's way) the resources are
fixed: their programs are written inline. In discovery mode, or with a
configuration file, they change while running: the resources' program files
are written into ``programs.d`` now, so they start at once, and a
``reconcile`` program keeps them up to date (see ``reconcile``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from macvtapdp import config, discovery, naming, programs
from macvtapdp.atomic import write_atomically
from macvtapdp.supervisord import RUN_DIR_VAR, Layout, render, self_command


def supervisord_argv() -> list[str]:
    """supervisord, through the shim that removes its one-second ticks."""
    return [sys.executable, "-m", "macvtapdp.supervise"]


def reconcile_argv(
    base: Sequence[str],
    *,
    plugin_dir: str,
    run_dir: str,
    config_file: str | None,
    filters: discovery.Filters,
    grace: float,
) -> list[str]:
    """The ``reconcile`` program's command line: every setting explicit, visible in ``ps``."""
    argv = [*base, "reconcile", f"--plugin-dir={plugin_dir}", f"--run-dir={run_dir}"]
    if config_file is not None:
        argv.append(f"--config-file={config_file}")
    return [*argv, *filters.argv(), f"--discover-grace={grace:g}"]


def _discover(filters: discovery.Filters, plugin_dir: str) -> list[config.Resource]:
    try:
        return discovery.offered(discovery.scan(filters, plugin_dir))
    except OSError as err:  # reconcile tries again
        print(f"macvtapdp: warning: cannot list links: {err}", file=sys.stderr)
        return []


@dataclass(frozen=True)
class Plan:
    """What ``run`` writes: the main config, the resources, and where they come from."""

    layout: Layout
    text: str
    resources: list[config.Resource]
    dynamic: bool
    summary: str
    base: list[str]


def plan(
    plugin_dir: str,
    config_file: str | None,
    run_dir: str,
    filters: discovery.Filters | None = None,
    grace: float = discovery.DEFAULT_GRACE,
) -> Plan:
    """Validate and render without writing anything (raises ConfigError/RenderError)."""
    filters = filters or discovery.Filters()
    layout = Layout(run_dir)
    if config_file is not None:
        # not realpath: a ConfigMap volume swaps the symlinks under this path
        config_file = os.path.abspath(config_file)
    conf = config.load(file=config_file)
    base = self_command()
    dynamic = config_file is not None or conf.discovery
    if dynamic:
        argv = reconcile_argv(
            base,
            plugin_dir=plugin_dir,
            run_dir=run_dir,
            config_file=config_file,
            filters=filters,
            grace=grace,
        )
        text = render(conf, plugin_dir=plugin_dir, layout=layout, base=base, reconcile=argv)
        resources = _discover(filters, plugin_dir) if conf.discovery else list(conf.resources)
        for r in resources:  # refuse unwritable values before anything is written
            programs.text(r, plugin_dir, base)
    else:
        text = render(conf, plugin_dir=plugin_dir, layout=layout, base=base)
        resources = list(conf.resources)
    names = ", ".join(r.name for r in resources) or "(none)"
    if conf.discovery:
        what = f"discovery mode ({filters.describe()}): {len(resources)} links offered: {names}"
    else:
        what = f"{len(resources)} resources from {conf.source}: {names}"
    follows = {
        (True, True): "; the reconcile program follows links and the file",
        (True, False): "; the reconcile program follows links",
        (False, True): "; the reconcile program follows the file",
    }.get((conf.discovery, config_file is not None), "")
    return Plan(layout, text, resources, dynamic, what + follows, base)


def launch(
    plugin_dir: str,
    config_file: str | None,
    run_dir: str,
    filters: discovery.Filters | None = None,
    grace: float = discovery.DEFAULT_GRACE,
) -> NoReturn:
    """Validate and render (raising ConfigError/RenderError), then become supervisord."""
    p = plan(plugin_dir, config_file, run_dir, filters, grace)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    if p.dynamic:
        programs.write(p.layout, p.resources, plugin_dir, p.base)
    write_atomically(p.layout.conf, p.text)
    print(
        f"macvtapdp: {p.summary}; starting supervisord with {p.layout.conf}",
        file=sys.stderr,
        flush=True,
    )
    # children inherit these: serve writes its state file, status finds it
    os.environ[RUN_DIR_VAR] = run_dir
    os.environ[naming.PLUGIN_DIR_VAR] = plugin_dir
    argv = supervisord_argv()
    os.execv(argv[0], [*argv, "--nodaemon", "--configuration", p.layout.conf])
