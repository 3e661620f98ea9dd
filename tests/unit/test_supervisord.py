"""The rendered supervisord config, read back by supervisor's own parser."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from supervisor.options import ServerOptions

from macvtapdp import config, supervisord
from macvtapdp.errors import ConfigError, RenderError

BASE = ["/usr/local/bin/macvtapdp"]


def parsed(text: str, tmp_path: Path) -> ServerOptions:
    """What supervisord itself makes of ``text``."""
    path = tmp_path / "supervisord.conf"
    path.write_text(text)
    options = ServerOptions()
    options.realize(args=["-c", str(path)])
    return options


def groups(options: ServerOptions) -> dict[str, Any]:
    return {g.name: g for g in options.process_group_configs}


def render(conf_json: list[dict[str, Any]], tmp_path: Path, plugin_dir: str = "/p") -> str:
    conf = config.parse(json.dumps(conf_json))
    return supervisord.render(
        conf, plugin_dir=plugin_dir, layout=supervisord.Layout(str(tmp_path)), base=BASE
    )


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
    assert shlex.split(program.command) == [
        *BASE,
        "serve",
        "dataplane",
        "--master=ens3",
        "--mode=vepa",
        "--capacity=7",
        "--plugin-dir=/p",
    ]
    assert program.autorestart is not False and program.stopasgroup and program.killasgroup
    assert program.stopsignal == 15 and program.stopwaitsecs == supervisord.STOP_WAIT_SECONDS
    assert program.stdout_logfile == "/dev/stdout" and program.redirect_stderr
    assert program.stdout_logfile_maxbytes == 0


def test_supervisord_runs_in_the_foreground_with_a_private_socket(tmp_path: Path) -> None:
    options = parsed(render([{"name": "a", "master": "x"}], tmp_path), tmp_path)
    assert options.nodaemon
    assert options.logfile == "/dev/null"  # nodaemon already echoes it to stdout
    [server] = options.server_configs
    assert server["family"].name == "AF_UNIX" and server["chmod"] == 0o700
    assert server["file"] == str(tmp_path / "supervisor.sock")
    assert "inet_http_server" not in (tmp_path / "supervisord.conf").read_text()


def test_watchdog_listens_for_fatal(tmp_path: Path) -> None:
    found = groups(parsed(render([{"name": "a", "master": "x"}], tmp_path), tmp_path))
    listener = found["watchdog"]
    assert shlex.split(listener.process_configs[0].command) == [*BASE, "watchdog"]
    assert {e.__name__ for e in listener.pool_events} == {
        "ProcessStateFatalEvent",
        "ProcessStateRunningEvent",
    }


@pytest.mark.parametrize(
    "master",
    ["e%th0", "%d", ";x", "#x", "a;b", "a#b", "x'y", 'x"y', "-x", "a\\b", "$HOME", "*"],
)
def test_hostile_interface_names_are_inert(master: str, tmp_path: Path) -> None:
    """Whatever the kernel allows in a name reaches serve unchanged, and only there."""
    found = groups(parsed(render([{"name": "a", "master": master}], tmp_path), tmp_path))
    assert set(found) == {"resource-a", "watchdog"}
    argv = shlex.split(found["resource-a"].process_configs[0].command)
    assert argv[argv.index("a") + 1] == f"--master={master}"


@pytest.mark.parametrize("plugin_dir", ["/var/lib/kube let", "/a%b", "/a;b", "/x#y"])
def test_odd_but_safe_paths_are_inert(plugin_dir: str, tmp_path: Path) -> None:
    found = groups(parsed(render([{"name": "a", "master": "x"}], tmp_path, plugin_dir), tmp_path))
    assert shlex.split(found["resource-a"].process_configs[0].command)[-1] == (
        f"--plugin-dir={plugin_dir}"
    )


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


def test_reconcile_mode_includes_program_files(tmp_path: Path) -> None:
    layout = supervisord.Layout(str(tmp_path))
    text = supervisord.render(
        config.parse("[]"), layout=layout, base=BASE, reconcile=[*BASE, "reconcile"]
    )
    programs = tmp_path / "programs.d"
    programs.mkdir()
    resource = config.Resource("eth0", "eth0")
    (programs / "resource-eth0.conf").write_text(supervisord.render_program(resource, "/p", BASE))
    found = groups(parsed(text, tmp_path))
    assert set(found) == {"reconcile", "resource-eth0", "watchdog"}
