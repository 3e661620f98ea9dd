"""The rendered supervisord config, read back by supervisor's own parser."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from supervisor.options import ServerOptions

from macvtapdp import config, settings
from macvtapdp.config import Resource
from macvtapdp.errors import ConfigError, RenderError
from macvtapdp.node import render as rendering
from macvtapdp.rundir import Layout

PLUGIN = [sys.executable, "-m", "macvtapdp.plugin"]


def parsed(text: str, tmp_path: Path) -> ServerOptions:
    """What supervisord itself makes of ``text``."""
    path = tmp_path / "supervisord.conf"
    path.write_text(text)
    options = ServerOptions()
    options.realize(args=["-c", str(path)])
    return options


def groups(options: ServerOptions) -> dict[str, Any]:
    return {g.name: g for g in options.process_group_configs}


def node(tmp_path: Path, plugin_dir: str = "/p", metrics: str = "") -> settings.Node:
    return settings.Node(
        plugin=settings.Plugin(plugin_dir=plugin_dir, run_dir=str(tmp_path), metrics=bool(metrics)),
        metrics_address=metrics,
    )


def render(
    conf_json: list[dict[str, Any]], tmp_path: Path, plugin_dir: str = "/p", metrics: str = ""
) -> str:
    conf = config.parse(json.dumps(conf_json))
    return rendering.render(
        node(tmp_path, plugin_dir, metrics), conf.resources, Layout(str(tmp_path)), dynamic=False
    )


def command(options: ServerOptions, group: str) -> list[str]:
    return shlex.split(groups(options)[group].process_configs[0].command)


def test_one_program_per_resource(tmp_path: Path) -> None:
    text = render(
        [
            {"name": "eth0", "master": "eth0"},
            {"name": "dataplane", "lowerDevice": "ens3", "mode": "vepa", "capacity": 7},
        ],
        tmp_path,
    )
    options = parsed(text, tmp_path)
    found = groups(options)
    assert set(found) == {"resource-eth0", "resource-dataplane", "watchdog"}
    program = found["resource-dataplane"].process_configs[0]
    argv = shlex.split(program.command)
    assert argv[:3] == PLUGIN
    assert argv[3:8] == [
        "--name=dataplane", "--lower=ens3", "--mode=vepa", "--capacity=7", "--plugin-dir=/p"
    ]  # fmt: skip
    assert program.autorestart is not False and program.stopasgroup and program.killasgroup
    assert program.stopsignal == 15 and program.stopwaitsecs == rendering.STOP_WAIT_SECONDS
    assert program.stdout_logfile == "/dev/stdout" and program.redirect_stderr
    assert program.stdout_logfile_maxbytes == 0


def test_the_command_line_is_the_settings_and_reads_back(tmp_path: Path) -> None:
    """One definition: what render writes is what the resource process parses."""
    options = parsed(render([{"name": "dp", "master": "ens3", "capacity": 9}], tmp_path), tmp_path)
    argv = command(options, "resource-dp")[len(PLUGIN) :]
    serve = settings.from_argv(settings.Serve, argv)
    assert serve == node(tmp_path).serve(Resource("dp", "ens3", capacity=9))


def test_supervisord_runs_in_the_foreground_with_a_private_socket(tmp_path: Path) -> None:
    options = parsed(render([{"name": "a", "master": "x"}], tmp_path), tmp_path)
    assert options.nodaemon
    # appended like the programs' output, and not echoed a second time: lines stay whole
    assert options.logfile == "/dev/stdout" and options.silent
    [server] = options.server_configs
    assert server["family"].name == "AF_UNIX" and server["chmod"] == 0o700
    assert server["file"] == str(tmp_path / "supervisor.sock")
    assert "inet_http_server" not in (tmp_path / "supervisord.conf").read_text()


def test_watchdog_listens_for_state_changes_and_ticks(tmp_path: Path) -> None:
    options = parsed(render([{"name": "a", "master": "x"}], tmp_path), tmp_path)
    listener = groups(options)["watchdog"]
    argv = command(options, "watchdog")
    assert argv[:3] == [sys.executable, "-m", "macvtapdp.node.watchdog"]
    assert settings.from_argv(settings.Node, argv[3:]) == node(tmp_path)
    names = {e.__name__ for e in listener.pool_events}
    assert {"ProcessStateEvent", "Tick5Event"} <= names


def test_the_metrics_program_is_there_only_with_an_address(tmp_path: Path) -> None:
    without = groups(parsed(render([{"name": "a", "master": "x"}], tmp_path), tmp_path))
    assert "metrics" not in without
    text = render([{"name": "a", "master": "x"}], tmp_path, metrics="127.0.0.1:9469")
    options = parsed(text, tmp_path)
    argv = command(options, "metrics")
    assert argv[:3] == [sys.executable, "-m", "macvtapdp.node.metrics"]
    assert "--metrics-address=127.0.0.1:9469" in argv


@pytest.mark.parametrize(
    "master",
    ["e%th0", "%d", ";x", "#x", "a;b", "a#b", "x'y", 'x"y', "-x", "a\\b", "$HOME", "*"],
)
def test_hostile_interface_names_are_inert(master: str, tmp_path: Path) -> None:
    """Whatever the kernel allows in a name reaches the resource process unchanged."""
    options = parsed(render([{"name": "a", "master": master}], tmp_path), tmp_path)
    assert set(groups(options)) == {"resource-a", "watchdog"}
    assert f"--lower={master}" in command(options, "resource-a")


@pytest.mark.parametrize("plugin_dir", ["/var/lib/kube let", "/a%b", "/a;b", "/x#y"])
def test_odd_but_safe_paths_are_inert(plugin_dir: str, tmp_path: Path) -> None:
    options = parsed(render([{"name": "a", "master": "x"}], tmp_path, plugin_dir), tmp_path)
    assert f"--plugin-dir={plugin_dir}" in command(options, "resource-a")


@pytest.mark.parametrize("plugin_dir", ["/a ;b", "/a #b", "/a\nb", "/a\n[program:evil]", "/a\rb"])
def test_values_that_would_change_the_file_are_refused(plugin_dir: str, tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="would change its meaning"):
        render([{"name": "a", "master": "x"}], tmp_path, plugin_dir)


@pytest.mark.parametrize(
    "name", ["a\nb", "a;b", "a b", "a%b", "a:b", "a/b", "x" * 36, "[program:evil]"]
)
def test_hostile_resource_names_are_refused_by_validation(name: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(json.dumps([{"name": name, "master": "x"}]))


@pytest.mark.parametrize("master", ["a\nb", "a b", "a\tb", "a:b", "a/b", "é", "x" * 16])
def test_hostile_interface_names_are_refused_by_validation(master: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(json.dumps([{"name": "a", "master": master}]))


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    conf = [{"name": f"r{i}", "master": f"eth{i}"} for i in range(5)]
    assert render(conf, tmp_path) == render(conf, tmp_path)


def test_dynamic_mode_includes_only_resource_program_files(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    text = rendering.render(node(tmp_path), [], layout, dynamic=True)
    programs = tmp_path / "programs.d"
    programs.mkdir()
    resource = Resource("eth0", "eth0")
    (programs / "resource-eth0.conf").write_text(rendering.render_program(node(tmp_path), resource))
    (programs / "evil.conf").write_text("[program:evil]\ncommand=/bin/true\n")
    found = groups(parsed(text, tmp_path))
    assert set(found) == {"reconcile", "resource-eth0", "watchdog"}
