"""``macvtapdp serve``'s own small parser: the per-resource process skips typer.

supervisord starts one serve process per resource, so what it loads is paid
once per resource. typer (with click, rich and pydantic at run time) costs
about 13 MiB of RSS per process, against a 45 MiB budget; argparse costs
almost nothing. ``__main__`` sends ``serve`` here; the typer command of the
same name exists for ``--help`` and calls ``run`` too. A unit test keeps the
two option lists equal.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from macvtapdp import config, naming
from macvtapdp.errors import ConfigError, PermanentError

# (flag, environment variable) of every option; the typer command declares the same
OPTIONS = {
    "--master": None,
    "--mode": None,
    "--capacity": None,
    "--plugin-dir": "MACVTAPDP_PLUGIN_DIR",
    "--config-file": config.ENV_FILE_VAR,
    "--run-dir": "MACVTAPDP_RUN_DIR",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="macvtapdp serve", allow_abbrev=False)
    p.add_argument("name")
    p.add_argument("--master")
    p.add_argument("--mode", choices=[m.value for m in config.Mode], default="bridge")
    p.add_argument("--capacity", type=int)
    p.add_argument("--plugin-dir")
    p.add_argument("--config-file")
    p.add_argument("--run-dir")
    return p


def resolve(
    name: str,
    master: str | None,
    mode: str,
    capacity: int | None,
    config_file: str | None,
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


def run(
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
    """Resolve the resource and serve it; return the exit code (2 for user mistakes)."""
    plugin_dir = plugin_dir or env.get("MACVTAPDP_PLUGIN_DIR") or naming.DEFAULT_PLUGIN_DIR
    config_file = config_file or env.get(config.ENV_FILE_VAR) or None
    run_dir = run_dir or env.get("MACVTAPDP_RUN_DIR") or None
    try:
        resource = resolve(name, master, mode, capacity, config_file)
        # gRPC's C core logs at INFO (e.g. every GOAWAY) unless told otherwise
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from macvtapdp.serve import serve
        from macvtapdp.supervisord import Layout

        state = Layout(run_dir).state_file(resource.name) if run_dir else None
        return serve(resource, plugin_dir, state)
    except PermanentError as err:
        for line in str(err).splitlines():
            print(f"macvtapdp: error: {line}", file=sys.stderr)
        return 2


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    return run(
        args.name,
        master=args.master,
        mode=args.mode,
        capacity=args.capacity,
        plugin_dir=args.plugin_dir,
        config_file=args.config_file,
        run_dir=args.run_dir,
    )
