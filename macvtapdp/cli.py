"""The ``macvtapdp`` command line (typer): ``run``, ``render-config`` and ``status``.

It only wires: options (each defined once, in ``settings``) become a
``settings.Node``, and the node side does the rest. Every user mistake is one
line, ``macvtapdp: error: ...``, and exit code 2, whether typer or the
configuration found it. The programs supervisord starts have lean entries of
their own (``python -m macvtapdp.plugin`` and ``macvtapdp.node.*``) that import
neither typer nor this module.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, NoReturn

import typer
from typer._click import exceptions as click_errors  # typer >= 0.26 vendors click

from macvtapdp import naming, settings
from macvtapdp.errors import PermanentError
from macvtapdp.settings import Setting

app = typer.Typer(
    help="Kubernetes device plugin that hands pods macvtap tap devices (/dev/tapN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _option(s: Setting) -> Any:
    return typer.Option(s.flag, envvar=s.env, help=s.help, metavar=s.metavar)


PluginDir = Annotated[str, _option(settings.PLUGIN_DIR)]
RunDir = Annotated[str, _option(settings.RUN_DIR)]
ConfigFile = Annotated[str | None, _option(settings.CONFIG_FILE)]
DiscoverInclude = Annotated[list[str] | None, _option(settings.DISCOVER_INCLUDE)]
DiscoverExclude = Annotated[list[str] | None, _option(settings.DISCOVER_EXCLUDE)]
DiscoverKinds = Annotated[list[str] | None, _option(settings.DISCOVER_KINDS)]
DiscoverGrace = Annotated[
    float,
    typer.Option(
        settings.DISCOVER_GRACE.flag,
        envvar=settings.DISCOVER_GRACE.env,
        help=settings.DISCOVER_GRACE.help,
        metavar=settings.DISCOVER_GRACE.metavar,
        min=0,
    ),
]
SweepGrace = Annotated[
    float,
    typer.Option(
        settings.SWEEP_GRACE.flag,
        envvar=settings.SWEEP_GRACE.env,
        help=settings.SWEEP_GRACE.help,
        metavar=settings.SWEEP_GRACE.metavar,
        min=0,
    ),
]
PodResourcesSocket = Annotated[str, _option(settings.POD_RESOURCES_SOCKET)]
NoTopology = Annotated[bool, _option(settings.NO_TOPOLOGY)]
MetricsAddress = Annotated[str, _option(settings.METRICS_ADDRESS)]


def _node(
    *,
    plugin_dir: str,
    run_dir: str,
    config_file: str | None,
    include: list[str] | None,
    exclude: list[str] | None,
    kinds: list[str] | None,
    discover_grace: float,
    sweep_grace: float,
    pod_resources_socket: str,
    no_topology: bool,
    metrics_address: str,
) -> settings.Node:
    from macvtapdp.node import discovery

    return settings.Node(
        plugin=settings.Plugin(
            plugin_dir=plugin_dir,
            run_dir=run_dir,
            pod_resources_socket=pod_resources_socket,
            sweep_grace=settings.check_sweep_grace(sweep_grace),
            topology=not no_topology,
            metrics=bool(metrics_address),
        ),
        config_file=config_file or None,
        discovery=settings.Discovery(
            discover_include=discovery.split(include),
            discover_exclude=discovery.split(exclude),
            discover_kinds=discovery.split(kinds),
            discover_grace=discover_grace,
        ),
        metrics_address=settings.check_address(metrics_address),
    )


def fail(err: PermanentError) -> NoReturn:
    """Print each problem on its own line and exit 2: no traceback for user mistakes."""
    for line in str(err).splitlines():
        print(f"macvtapdp: error: {line}", file=sys.stderr)
    raise SystemExit(2)


@app.command()
def run(
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    run_dir: RunDir = settings.DEFAULT_RUN_DIR,
    config_file: ConfigFile = None,
    discover_include: DiscoverInclude = None,
    discover_exclude: DiscoverExclude = None,
    discover_kinds: DiscoverKinds = None,
    discover_grace: DiscoverGrace = settings.DEFAULT_DISCOVER_GRACE,
    sweep_grace: SweepGrace = settings.DEFAULT_SWEEP_GRACE,
    pod_resources_socket: PodResourcesSocket = settings.DEFAULT_POD_RESOURCES_SOCKET,
    no_topology: NoTopology = False,
    metrics_address: MetricsAddress = settings.DEFAULT_METRICS_ADDRESS,
) -> None:
    """Start everything: validate, render, and exec supervisord (the DaemonSet entrypoint).

    Without a configuration (DP_MACVTAP_CONF unset or []), discovery mode: one
    resource per physical NIC or bond, named after it, following links as they
    come and go. With --config-file, changes to the file are applied live:
    only the resources whose settings changed restart.
    """
    from macvtapdp.node.run import launch

    try:
        launch(
            _node(
                plugin_dir=plugin_dir,
                run_dir=run_dir,
                config_file=config_file,
                include=discover_include,
                exclude=discover_exclude,
                kinds=discover_kinds,
                discover_grace=discover_grace,
                sweep_grace=sweep_grace,
                pod_resources_socket=pod_resources_socket,
                no_topology=no_topology,
                metrics_address=metrics_address,
            )
        )
    except PermanentError as err:
        fail(err)


@app.command("render-config")
def render_config(
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    run_dir: RunDir = settings.DEFAULT_RUN_DIR,
    config_file: ConfigFile = None,
    discover_include: DiscoverInclude = None,
    discover_exclude: DiscoverExclude = None,
    discover_kinds: DiscoverKinds = None,
    discover_grace: DiscoverGrace = settings.DEFAULT_DISCOVER_GRACE,
    sweep_grace: SweepGrace = settings.DEFAULT_SWEEP_GRACE,
    pod_resources_socket: PodResourcesSocket = settings.DEFAULT_POD_RESOURCES_SOCKET,
    no_topology: NoTopology = False,
    metrics_address: MetricsAddress = settings.DEFAULT_METRICS_ADDRESS,
) -> None:
    """Validate the configuration and print the supervisord config `run` would write."""
    from macvtapdp import files
    from macvtapdp.node.run import plan

    try:
        text = plan(
            _node(
                plugin_dir=plugin_dir,
                run_dir=run_dir,
                config_file=config_file,
                include=discover_include,
                exclude=discover_exclude,
                kinds=discover_kinds,
                discover_grace=discover_grace,
                sweep_grace=sweep_grace,
                pod_resources_socket=pod_resources_socket,
                no_topology=no_topology,
                metrics_address=metrics_address,
            )
        ).text
        if output is None:
            sys.stdout.write(text)
        else:
            files.write_atomically(output, text, mode=0o644)
    except PermanentError as err:
        fail(err)
    except OSError as err:
        fail(PermanentError(f"--output: cannot write {output}: {err.strerror}"))


@app.command()
def status(
    run_dir: RunDir = settings.DEFAULT_RUN_DIR,
    alive: Annotated[
        bool,
        typer.Option(
            "--alive",
            help="Only check that supervisord answers (a liveness probe: supervisord "
            "and its watchdog restart failed resources themselves).",
        ),
    ] = False,
) -> None:
    """Show each resource's process, registration and devices; exit 0 only if all serve.

    Exit codes, as supervisorctl's: 0 all serving, 3 something is not, 4
    supervisord does not answer.
    """
    from macvtapdp.node import status as st

    raise SystemExit(st.report(run_dir, alive))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; usage errors in the one-line style, exit 2."""
    try:
        result = app(args=argv, prog_name="macvtapdp", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as err:
        print(err.ctx.get_help() if err.ctx is not None else err.format_message())
        return 2
    except click_errors.UsageError as err:
        hint = f" (see: {err.ctx.command_path} --help)" if err.ctx is not None else ""
        print(f"macvtapdp: error: {err.format_message()}{hint}", file=sys.stderr)
        return 2
    except click_errors.ClickException as err:
        print(f"macvtapdp: error: {err.format_message()}", file=sys.stderr)
        return err.exit_code
    except typer.Abort:
        print("macvtapdp: aborted", file=sys.stderr)
        return 1
    except typer.Exit as done:
        return int(done.exit_code)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    return result if isinstance(result, int) else 0
