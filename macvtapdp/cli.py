"""The ``macvtapdp`` command line: it only wires the modules together.

Commands import what they need when they run, so ``render-config`` and ``run``
never load grpc, and each ``serve`` process loads only the serving path.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Annotated, NoReturn

import typer

from macvtapdp import config, naming
from macvtapdp.errors import PermanentError
from macvtapdp.supervisord import DEFAULT_RUN_DIR, Layout

app = typer.Typer(
    help="Kubernetes device plugin that hands pods macvtap tap devices (/dev/tapN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PluginDir = Annotated[
    str,
    typer.Option(
        envvar="MACVTAPDP_PLUGIN_DIR",
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
    for line in str(err).splitlines():
        print(f"macvtapdp: error: {line}", file=sys.stderr)
    raise typer.Exit(2)


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
        typer.Option(envvar="MACVTAPDP_RUN_DIR", help="Report state here for `status`."),
    ] = None,
) -> None:
    """Serve one resource to the kubelet (supervisord runs one per resource)."""
    from macvtapdp import servecmd

    raise typer.Exit(
        servecmd.run(
            name,
            master=master,
            mode=mode.value,
            capacity=capacity,
            plugin_dir=plugin_dir,
            config_file=config_file,
            run_dir=run_dir,
        )
    )


RunDir = Annotated[
    str,
    typer.Option(
        envvar="MACVTAPDP_RUN_DIR",
        help="Where supervisord's config, control socket and state files live.",
    ),
]


def _render(conf: config.Config, plugin_dir: str, layout: Layout) -> str:
    from macvtapdp import supervisord

    return supervisord.render(conf, plugin_dir=plugin_dir, layout=layout)


@app.command("render-config")
def render_config(
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    config_file: ConfigFile = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    """Validate the configuration and print the supervisord config for it."""
    try:
        conf = config.load(file=config_file)
        text = _render(conf, plugin_dir, Layout(run_dir))
    except PermanentError as err:
        fail(err)
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)


@app.command()
def run(
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    config_file: ConfigFile = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    """Start everything: validate, render, and exec supervisord (the DaemonSet entrypoint)."""
    layout = Layout(run_dir)
    try:
        conf = config.load(file=config_file)
        text = _render(conf, plugin_dir, layout)
    except PermanentError as err:
        fail(err)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    write_atomically(layout.conf, text)
    names = ", ".join(r.name for r in conf.resources) or "(none)"
    print(
        f"macvtapdp: {len(conf.resources)} resources from {conf.source}: {names}; "
        f"starting supervisord with {layout.conf}",
        file=sys.stderr,
        flush=True,
    )
    # children inherit these: serve writes its state file, status finds it
    os.environ["MACVTAPDP_RUN_DIR"] = run_dir
    os.environ["MACVTAPDP_PLUGIN_DIR"] = plugin_dir
    supervisord = _supervisord()
    os.execv(supervisord[0], [*supervisord, "--nodaemon", "--configuration", layout.conf])


def _supervisord() -> list[str]:
    """supervisord from this installation (beside our interpreter), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "supervisord")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("supervisord")
    return [found] if found else [sys.executable, "-m", "supervisor.supervisord"]


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new file, never half."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


@app.command()
def status(
    plugin_dir: PluginDir = naming.DEFAULT_PLUGIN_DIR,
    run_dir: RunDir = DEFAULT_RUN_DIR,
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
    rows = [st.row(info, layout, plugin_dir) for info in infos]
    print(st.table(rows))
    raise typer.Exit(st.EXIT_OK if all(r.ok for r in rows) else st.EXIT_DOWN)


@app.command(hidden=True)
def watchdog() -> None:
    """supervisord event listener: start FATAL programs again, with backoff."""
    from macvtapdp import watchdog as wd

    raise typer.Exit(wd.main())
