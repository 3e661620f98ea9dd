"""The ``macvtapdp`` command line: it only wires the modules together.

Commands import what they need when they run, so ``render-config`` and ``run``
never load grpc, and each ``serve`` process loads only the serving path.
"""

from __future__ import annotations

import sys
from typing import Annotated, NoReturn

import typer

from macvtapdp import config, naming
from macvtapdp.errors import ConfigError, PermanentError

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
) -> None:
    """Serve one resource to the kubelet (supervisord runs one per resource)."""
    try:
        if master is not None:
            fields: dict[str, object] = {"name": name, "master": master, "mode": mode.value}
            if capacity is not None:
                fields["capacity"] = capacity
            resource = config.resource(fields, "serve")
        else:
            resource = _configured(name, config.load(file=config_file))
        from macvtapdp.serve import serve as serve_resource

        raise typer.Exit(serve_resource(resource, plugin_dir))
    except PermanentError as err:
        fail(err)


def _configured(name: str, conf: config.Config) -> config.Resource:
    """Resource ``name`` of the configuration (in discovery mode: the link ``name``)."""
    if conf.discovery:
        return config.resource({"name": name, "master": name}, "serve")
    found = conf.get(name)
    if found is None:
        known = ", ".join(r.name for r in conf.resources)
        raise ConfigError(
            [f"serve: no resource named {name!r} in {conf.source} (configured: {known})"]
        )
    return found
