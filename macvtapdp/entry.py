"""Small argparse front ends for the commands the container runs by itself.

``run`` starts every container, ``serve`` runs once per resource, and
``watchdog`` and ``reconcile`` (in discovery mode or with a configuration file)
beside them, so what they load is paid at every start and, for ``serve``, once
per resource. typer
(with click, rich and pydantic) costs about 0.25 s and 13 MiB of RSS per
process, against a 2 s cold-start and a 45 MiB per-resource budget; argparse
costs almost nothing. ``__main__`` sends these commands here; the typer
commands of the same names (for ``--help`` and humans) call the same
functions, and a unit test keeps the option lists of both equal.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence

from macvtapdp import config, discovery, naming
from macvtapdp.errors import ConfigError, PermanentError
from macvtapdp.supervisord import DEFAULT_RUN_DIR, RUN_DIR_VAR

# Options of each command and the environment variable each falls back to
SERVE_OPTIONS: dict[str, str | None] = {
    "--master": None,
    "--mode": None,
    "--capacity": None,
    "--plugin-dir": naming.PLUGIN_DIR_VAR,
    "--config-file": config.ENV_FILE_VAR,
    "--run-dir": RUN_DIR_VAR,
}
DISCOVERY_OPTIONS: dict[str, str | None] = {
    "--discover-include": discovery.INCLUDE_VAR,
    "--discover-exclude": discovery.EXCLUDE_VAR,
    "--discover-kinds": discovery.KINDS_VAR,
    "--discover-grace": discovery.GRACE_VAR,
}
RUN_OPTIONS: dict[str, str | None] = {
    "--plugin-dir": naming.PLUGIN_DIR_VAR,
    "--config-file": config.ENV_FILE_VAR,
    "--run-dir": RUN_DIR_VAR,
    **DISCOVERY_OPTIONS,
}
RECONCILE_OPTIONS: dict[str, str | None] = dict(RUN_OPTIONS)
_LISTS = ("--discover-include", "--discover-exclude", "--discover-kinds")


def report(err: PermanentError) -> int:
    """Print each problem on its own line; the exit code for user mistakes."""
    for line in str(err).splitlines():
        print(f"macvtapdp: error: {line}", file=sys.stderr)
    return 2


def _env(value: str | None, var: str | None, env: Mapping[str, str]) -> str | None:
    return value or (env.get(var) if var else None) or None


def resolve(
    name: str, master: str | None, mode: str, capacity: int | None, config_file: str | None
) -> config.Resource:
    """The resource to serve: given by the options, or looked up in the configuration.

    In discovery mode a resource is the link of the same name.
    """
    if master is not None:
        fields: dict[str, object] = {"name": name, "master": master, "mode": mode}
        if capacity is not None:
            fields["capacity"] = capacity
        return config.resource(fields, "serve")
    conf = config.load(file=config_file)
    if conf.discovery:
        return config.resource({"name": name, "master": name}, "serve")
    found = conf.get(name)
    if found is None:
        known = ", ".join(r.name for r in conf.resources)
        raise ConfigError(
            [f"serve: no resource named {name!r} in {conf.source} (configured: {known})"]
        )
    return found


def serve(
    name: str,
    *,
    master: str | None = None,
    mode: str = "bridge",
    capacity: int | None = None,
    plugin_dir: str | None = None,
    config_file: str | None = None,
    run_dir: str | None = None,
    env: Mapping[str, str] = os.environ,
) -> int:
    """``macvtapdp serve``: resolve the resource and serve it; the exit code."""
    plugin_dir = _env(plugin_dir, naming.PLUGIN_DIR_VAR, env) or naming.DEFAULT_PLUGIN_DIR
    config_file = _env(config_file, config.ENV_FILE_VAR, env)
    run_dir = _env(run_dir, RUN_DIR_VAR, env)
    try:
        resource = resolve(name, master, mode, capacity, config_file)
        # gRPC's C core logs at INFO (e.g. every GOAWAY) unless told otherwise
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from macvtapdp.serve import serve as serve_resource
        from macvtapdp.supervisord import Layout

        state = Layout(run_dir).state_file(resource.name) if run_dir else None
        return serve_resource(resource, plugin_dir, state)
    except PermanentError as err:
        return report(err)


def discovery_settings(
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    kinds: Sequence[str] | None,
    grace: float | str | None,
    env: Mapping[str, str],
) -> tuple[discovery.Filters, float]:
    """The discovery filters and grace from the options, else their environment variables."""

    def items(values: Sequence[str] | None, var: str) -> tuple[str, ...]:
        return discovery.split(values) or discovery.split(env.get(var))

    if grace is None or grace == "":
        grace = env.get(discovery.GRACE_VAR) or discovery.DEFAULT_GRACE
    try:
        seconds = float(grace)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(
            [f"--discover-grace: must be a number of seconds >= 0, got {str(grace)!r}"]
        )
    filters = discovery.Filters(
        include=items(include, discovery.INCLUDE_VAR),
        exclude=items(exclude, discovery.EXCLUDE_VAR),
        kinds=items(kinds, discovery.KINDS_VAR),
    )
    return filters, seconds


def _launch_args(
    plugin_dir: str | None,
    config_file: str | None,
    run_dir: str | None,
    discover: tuple[Sequence[str] | None, Sequence[str] | None, Sequence[str] | None],
    discover_grace: float | str | None,
    env: Mapping[str, str],
) -> tuple[str, str | None, str, discovery.Filters, float]:
    """``run``'s settings, options first, then environment, then defaults."""
    filters, grace = discovery_settings(*discover, discover_grace, env)
    return (
        _env(plugin_dir, naming.PLUGIN_DIR_VAR, env) or naming.DEFAULT_PLUGIN_DIR,
        _env(config_file, config.ENV_FILE_VAR, env),
        _env(run_dir, RUN_DIR_VAR, env) or DEFAULT_RUN_DIR,
        filters,
        grace,
    )


def run(
    *,
    plugin_dir: str | None = None,
    config_file: str | None = None,
    run_dir: str | None = None,
    discover_include: Sequence[str] | None = None,
    discover_exclude: Sequence[str] | None = None,
    discover_kinds: Sequence[str] | None = None,
    discover_grace: float | str | None = None,
    env: Mapping[str, str] = os.environ,
) -> int:
    """``macvtapdp run``: becomes supervisord; returns only on bad configuration."""
    from macvtapdp.launch import launch

    discover = (discover_include, discover_exclude, discover_kinds)
    try:
        launch(*_launch_args(plugin_dir, config_file, run_dir, discover, discover_grace, env))
    except PermanentError as err:
        return report(err)


def render_config(
    *,
    output: str | None = None,
    plugin_dir: str | None = None,
    config_file: str | None = None,
    run_dir: str | None = None,
    discover_include: Sequence[str] | None = None,
    discover_exclude: Sequence[str] | None = None,
    discover_kinds: Sequence[str] | None = None,
    discover_grace: float | str | None = None,
    env: Mapping[str, str] = os.environ,
) -> int:
    """``macvtapdp render-config``: the config ``run`` would write, to ``output`` or stdout."""
    from macvtapdp.atomic import write_atomically
    from macvtapdp.launch import plan

    discover = (discover_include, discover_exclude, discover_kinds)
    try:
        text = plan(
            *_launch_args(plugin_dir, config_file, run_dir, discover, discover_grace, env)
        ).text
    except PermanentError as err:
        return report(err)
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)
    return 0


def reconcile(
    *,
    plugin_dir: str | None = None,
    config_file: str | None = None,
    run_dir: str | None = None,
    discover_include: Sequence[str] | None = None,
    discover_exclude: Sequence[str] | None = None,
    discover_kinds: Sequence[str] | None = None,
    discover_grace: float | str | None = None,
    env: Mapping[str, str] = os.environ,
) -> int:
    """``macvtapdp reconcile`` (supervisord runs it): the exit code."""
    from macvtapdp import reconcile as rec
    from macvtapdp.supervisord import self_command

    discover = (discover_include, discover_exclude, discover_kinds)
    try:
        plugin, file, run, filters, grace = _launch_args(
            plugin_dir, config_file, run_dir, discover, discover_grace, env
        )
        return rec.main(
            plugin_dir=plugin,
            run_dir=run,
            config_file=os.path.abspath(file) if file else None,
            filters=filters,
            grace=grace,
            base=self_command(),
        )
    except PermanentError as err:
        return report(err)


def _parser(command: str, options: Mapping[str, str | None]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"macvtapdp {command}", allow_abbrev=False)
    for flag in options:
        kwargs: dict[str, object] = {}
        if flag == "--capacity":
            kwargs["type"] = int
        elif flag in _LISTS:
            kwargs["action"] = "append"
        elif flag == "--mode":
            kwargs.update(choices=[m.value for m in config.Mode], default="bridge")
        p.add_argument(flag, **kwargs)  # type: ignore[arg-type]
    return p


def main(command: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` of ``command`` (``serve``, ``run``, ``reconcile``, ``watchdog``); run it."""
    if command == "watchdog":
        argparse.ArgumentParser(prog="macvtapdp watchdog").parse_args(argv)
        from macvtapdp import watchdog

        return watchdog.main()
    if command == "serve":
        p = _parser("serve", SERVE_OPTIONS)
        p.add_argument("name")
        args = vars(p.parse_args(argv))
        name = args.pop("name")
        return serve(name, **args)
    if command == "reconcile":
        return reconcile(**vars(_parser("reconcile", RECONCILE_OPTIONS).parse_args(argv)))
    args = vars(_parser("run", RUN_OPTIONS).parse_args(argv))
    return run(**args)
