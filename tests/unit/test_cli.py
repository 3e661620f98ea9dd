"""The command line as a user meets it: help, errors, and the two front ends agreeing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from macvtapdp import entry
from macvtapdp.cli import app

runner = CliRunner()
COMMANDS = {"run", "serve", "render-config", "status"}


def cli_options(command: str) -> dict[str, str | None]:
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    found: dict[str, str | None] = {}
    for p in params:
        if p.param_type_name == "option":
            envvar = p.envvar if isinstance(p.envvar, str) else None
            found[p.opts[0]] = envvar
    return found


def test_help_lists_every_command_with_a_line() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in result.output
    assert " watchdog " not in result.output  # supervisord's, not the user's


@pytest.mark.parametrize(
    ("command", "options"), [("serve", entry.SERVE_OPTIONS), ("run", entry.RUN_OPTIONS)]
)
def test_fast_front_end_takes_the_same_options(
    command: str, options: dict[str, str | None]
) -> None:
    """``serve`` and ``run`` skip typer; both parsers must accept the same things."""
    assert cli_options(command) == options
    parser = entry._parser(command, options)
    assert {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h"} == set(
        options
    )


BAD = '[{"name":"a b","master":"eth0"},{"name":"x","master":"y","mode":"nope"}]'
BAD_LINES = [
    'macvtapdp: error: DP_MACVTAP_CONF[0].name: "a b" is not a valid resource name: use '
    'letters, digits, "-", "_" or ".", starting and ending with a letter or digit',
    'macvtapdp: error: DP_MACVTAP_CONF[1].mode: unknown mode "nope"; expected one of: '
    "bridge, passthru, private, vepa",
]


def test_render_config_refuses_bad_configuration_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "supervisord.conf"
    result = runner.invoke(app, ["render-config", "-o", str(out)], env={"DP_MACVTAP_CONF": BAD})
    assert result.exit_code == 2
    assert result.output.splitlines() == BAD_LINES
    assert not out.exists()


def test_render_config_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "supervisord.conf"
    conf = '[{"name":"eth0","master":"eth0"}]'
    result = runner.invoke(app, ["render-config", "-o", str(out)], env={"DP_MACVTAP_CONF": conf})
    assert result.exit_code == 0, result.output
    assert "[program:resource-eth0]" in out.read_text()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "macvtapdp", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_run_refuses_bad_configuration_and_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(
        "run", f"--run-dir={run_dir}", f"--plugin-dir={tmp_path}", env={"DP_MACVTAP_CONF": BAD}
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == BAD_LINES and done.stdout == ""
    assert not run_dir.exists()


def test_run_with_an_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    done = run_cli("run", f"--config-file={missing}", f"--run-dir={tmp_path}/r", env={})
    assert done.returncode == 2
    assert done.stderr == (
        f"macvtapdp: error: {missing}: cannot read configuration file: No such file or directory\n"
    )


def test_serve_for_an_unconfigured_name_says_which_exist() -> None:
    done = run_cli("serve", "eth9", env={"DP_MACVTAP_CONF": '[{"name":"eth0","master":"e"}]'})
    assert done.returncode == 2
    assert done.stderr == (
        "macvtapdp: error: serve: no resource named 'eth9' in DP_MACVTAP_CONF (configured: eth0)\n"
    )


def test_status_without_supervisord_exits_4(tmp_path: Path) -> None:
    done = run_cli("status", f"--run-dir={tmp_path}", env={})
    assert done.returncode == 4
    assert done.stderr.startswith(
        f"macvtapdp: error: cannot reach supervisord at unix://{tmp_path}"
    )
