"""The ``macvtapdp`` command line: it only wires the modules together.

Commands import what they need when they run, so ``render-config`` and ``run``
never load grpc, and each ``serve`` process loads only the serving path.
"""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer

from macvtapdp import config, discovery, naming
from macvtapdp.errors import PermanentError
from macvtapdp.supervisord import DEFAULT_RUN_DIR, RUN_DIR_VAR, Layout

app = typer.Typer(
    help="Kubernetes device plugin that hands pods macvtap tap devices (/dev/tapN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PluginDir = Annotated[
    str,
    typer.Option(
        envvar=naming.PLUGIN_DIR_VAR,
        help="The kubelet's device-plugin directory (kubelet.sock and plugin sockets).",
    ),
]
ConfigFile = Annotated[
    str | None,
    typer.Option(
        envvar=config.ENV_FILE_VAR,
        help=f"Read the configuration from this file instead of ${config.ENV_VAR}.",
    ),
]


def fail(err: PermanentError) -> NoReturn:
    """Print each problem on its own line and exit 2: no traceback for user mistakes."""
    from macvtapdp.entry import report

    raise typer.Exit(report(err))


RunDir = Annotated[
    str,
    typer.Option(
        envvar=RUN_DIR_VAR,
        help="Where supervisord's config, control socket and state files live.",
    ),
]


DiscoverInclude = Annotated[
    list[str] | None,
    typer.Option(
        envvar=discovery.INCLUDE_VAR,
        metavar="GLOB",
        help="Discovery: offer only links whose name matches one of these globs "
        "(repeat the option, or separate with commas).",
    ),
]
DiscoverExclude = Annotated[
    list[str] | None,
    typer.Option(
        envvar=discovery.EXCLUDE_VAR,
        metavar="GLOB",
        help="Discovery: never offer links whose name matches one of these globs.",
    ),
]
DiscoverKinds = Annotated[
    list[str] | None,
    typer.Option(
        envvar=discovery.KINDS_VAR,
        metavar="KIND",
        help="Discovery: also offer links of these kinds, besides physical NICs and bonds: "
        "a link kind as `ip -d link` shows it (veth, bridge, vlan, team...) or usb, "
        "thunderbolt, wireless, virtual (no kind, no device).",
    ),
]
DiscoverGrace = Annotated[
    float,
    typer.Option(
        envvar=discovery.GRACE_VAR,
        metavar="SECONDS",
        min=0,
        help="Discovery: keep the resource of a link that disappeared this long, "
        "so a link deleted and created again keeps its process and kubelet stream.",
    ),
]


@app.command()
def run(
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    config_file: ConfigFile = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    discover_include: DiscoverInclude = None,
    discover_exclude: DiscoverExclude = None,
    discover_kinds: DiscoverKinds = None,
    discover_grace: DiscoverGrace = discovery.DEFAULT_GRACE,
) -> None:
    """Start everything: validate, render, and exec supervisord (the DaemonSet entrypoint).

    Without a configuration (DP_MACVTAP_CONF unset or []), discovery mode: one
    resource per physical NIC or bond, named after it, following links as they
    come and go. With --config-file, changes to the file are applied live:
    only the resources whose settings changed restart.
    """
    from macvtapdp import entry

    raise typer.Exit(
        entry.run(
            plugin_dir=plugin_dir,
            config_file=config_file,
            run_dir=run_dir,
            discover_include=discover_include,
            discover_exclude=discover_exclude,
            discover_kinds=discover_kinds,
            discover_grace=discover_grace,
        )
    )


@app.command(hidden=True)
def reconcile(
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    config_file: ConfigFile = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    discover_include: DiscoverInclude = None,
    discover_exclude: DiscoverExclude = None,
    discover_kinds: DiscoverKinds = None,
    discover_grace: DiscoverGrace = discovery.DEFAULT_GRACE,
) -> None:
    """supervisord's program: keep the resource programs equal to the links or the file."""
    from macvtapdp import entry

    raise typer.Exit(
        entry.reconcile(
            plugin_dir=plugin_dir,
            config_file=config_file,
            run_dir=run_dir,
            discover_include=discover_include,
            discover_exclude=discover_exclude,
            discover_kinds=discover_kinds,
            discover_grace=discover_grace,
        )
    )


@app.command("render-config")
def render_config(
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    config_file: ConfigFile = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    discover_include: DiscoverInclude = None,
    discover_exclude: DiscoverExclude = None,
    discover_kinds: DiscoverKinds = None,
    discover_grace: DiscoverGrace = discovery.DEFAULT_GRACE,
) -> None:
    """Validate the configuration and print the supervisord config `run` would write."""
    from macvtapdp import entry

    raise typer.Exit(
        entry.render_config(
            output=output,
            plugin_dir=plugin_dir,
            config_file=config_file,
            run_dir=run_dir,
            discover_include=discover_include,
            discover_exclude=discover_exclude,
            discover_kinds=discover_kinds,
            discover_grace=discover_grace,
        )
    )


@app.command()
def status(
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    alive: Annotated[
        bool,
        typer.Option(
            "--alive",
            help="Only check that supervisord answers (a liveness probe: supervisord "
            "and its watchdog restart failed resources themselves).",
        ),
    ] = False,
) -> None:
    """Show each resource's process, registration and devices; exit 0 only if all serve."""
    from macvtapdp import control
    from macvtapdp import status as st

    layout = Layout(run_dir)
    try:
        infos = control.processes(layout)
    except control.Unreachable as err:
        print(f"macvtapdp: error: {err}", file=sys.stderr)
        raise typer.Exit(st.EXIT_UNREACHABLE) from None
    if alive:
        print(f"supervisord answers: {len(infos)} programs")
        raise typer.Exit(st.EXIT_OK)
    rows = st.rows(infos, layout, plugin_dir)
    print(st.table(rows))
    raise typer.Exit(st.EXIT_OK if all(r.ok for r in rows) else st.EXIT_DOWN)


@app.command()
def serve(
    name: Annotated[str, typer.Argument(help="The resource: macvtap.network.kubevirt.io/NAME.")],
    master: Annotated[
        str | None,
        typer.Option(help="Lower link; with it, the resource is given by these options."),
    ] = None,
    mode: Annotated[config.Mode, typer.Option(help="macvtap mode (with --master).")] = (
        config.Mode.BRIDGE
    ),
    capacity: Annotated[
        int | None, typer.Option(help="Devices offered (with --master; default 100).")
    ] = None,
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    config_file: ConfigFile = None,
    run_dir: Annotated[
        str | None,
        typer.Option(envvar=RUN_DIR_VAR, help="Report state here for `status`."),
    ] = None,
) -> None:
    """Serve one resource to the kubelet (supervisord runs one per resource)."""
    from macvtapdp import entry

    raise typer.Exit(
        entry.serve(
            name,
            master=master,
            mode=mode.value,
            capacity=capacity,
            plugin_dir=plugin_dir,
            config_file=config_file,
            run_dir=run_dir,
        )
    )


@app.command(hidden=True)
def watchdog() -> None:
    """supervisord event listener: start FATAL programs again, with backoff."""
    from macvtapdp import watchdog as wd

    raise typer.Exit(wd.main())
