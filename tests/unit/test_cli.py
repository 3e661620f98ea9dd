"""The command line as a user meets it: help, one error style, and the lean program entries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ("run", "render-config", "status")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``macvtapdp ARGS`` as a person runs it (a fresh process: exit codes and streams)."""
    return subprocess.run(
        [sys.executable, "-m", "macvtapdp", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_lists_every_command_with_a_line() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in COMMANDS:
        assert f"  {command}  " in done.stdout
    for internal in ("serve", "reconcile", "watchdog", "metrics"):
        assert f"  {internal} " not in done.stdout  # supervisord's programs, not commands


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_short_and_long_help_work_everywhere(command: str, flag: str) -> None:
    done = cli(command, flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: macvtapdp {command} [OPTIONS]")
    assert "-h, --help" in done.stdout


def test_flags_that_take_no_value_are_shown_as_such() -> None:
    out = cli("status", "--help").stdout
    assert "  --alive  " in out or "  --alive\n" in out
    assert "--alive BOOL" not in out and "--alive <bool>" not in out
    assert "--no-topology  " in cli("run", "--help").stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_is_one_line_and_exit_2(command: str) -> None:
    done = cli(command, "--bogus")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"macvtapdp: error: No such option: --bogus (see: macvtapdp {command} --help)\n"
    )


@pytest.mark.parametrize("command", ["run", "render-config"])
def test_a_bad_value_gets_the_same_message_from_every_command(command: str) -> None:
    done = cli(command, "--discover-grace=-1")
    assert done.returncode == 2
    assert done.stderr.startswith("macvtapdp: error: Invalid value for '--discover-grace'")
    assert "-1.0 is not in the range x>=0" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_an_unknown_command_is_one_line() -> None:
    done = cli("serve", "eth0")
    assert done.returncode == 2
    assert done.stderr.startswith("macvtapdp: error: No such command 'serve'")


def test_no_arguments_shows_the_help() -> None:
    done = cli()
    assert done.returncode == 2
    assert done.stdout.startswith("Usage: macvtapdp [OPTIONS] COMMAND")


BAD = '[{"name":"a b","master":"eth0"},{"name":"x","master":"y","mode":"nope"}]'
BAD_LINES = [
    'macvtapdp: error: DP_MACVTAP_CONF[0].name: "a b" is not a valid resource name: use '
    'letters, digits, "-", "_" or ".", starting and ending with a letter or digit',
    'macvtapdp: error: DP_MACVTAP_CONF[1].mode: unknown mode "nope"; expected one of: '
    "bridge, passthru, private, vepa",
]


def test_render_config_refuses_bad_configuration_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "supervisord.conf"
    done = cli("render-config", "-o", str(out), env={"DP_MACVTAP_CONF": BAD})
    assert done.returncode == 2
    assert done.stderr.splitlines() == BAD_LINES
    assert not out.exists()


def test_render_config_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "supervisord.conf"
    conf = '[{"name":"eth0","master":"eth0"}]'
    done = cli("render-config", "-o", str(out), env={"DP_MACVTAP_CONF": conf})
    assert done.returncode == 0, done.stderr
    assert "[program:resource-eth0]" in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o644


def test_run_refuses_bad_configuration_and_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = cli(
        "run", f"--run-dir={run_dir}", f"--plugin-dir={tmp_path}", env={"DP_MACVTAP_CONF": BAD}
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == BAD_LINES and done.stdout == ""
    assert not run_dir.exists()


@pytest.mark.parametrize("blank", ["", " ", "\n\t"])
def test_a_blank_configuration_is_refused_not_taken_for_discovery(blank: str) -> None:
    done = cli("render-config", env={"DP_MACVTAP_CONF": blank})
    assert done.returncode == 2
    assert done.stderr == (
        "macvtapdp: error: DP_MACVTAP_CONF: is blank; unset it, or write [] for discovery "
        "mode (one resource per NIC)\n"
    )


def test_run_with_an_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    done = cli("run", f"--config-file={missing}", f"--run-dir={tmp_path}/r")
    assert done.returncode == 2
    assert done.stderr == (
        f"macvtapdp: error: {missing}: cannot read configuration file: No such file or directory\n"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("address", ["9469", "host:", ":99999", "a b:1"])
def test_a_bad_metrics_address_is_refused(address: str) -> None:
    done = cli("render-config", f"--metrics-address={address}", env={"DP_MACVTAP_CONF": "[]"})
    assert done.returncode == 2
    assert done.stderr.startswith(f"macvtapdp: error: --metrics-address: '{address}'")


def test_status_without_supervisord_exits_4(tmp_path: Path) -> None:
    done = cli("status", f"--run-dir={tmp_path}")
    assert done.returncode == 4
    assert done.stderr.startswith(
        f"macvtapdp: error: cannot reach supervisord at unix://{tmp_path}"
    )


@pytest.mark.parametrize(
    "module",
    ["macvtapdp.plugin", "macvtapdp.node.reconcile", "macvtapdp.node.watchdog",
     "macvtapdp.node.metrics"],
)  # fmt: skip
def test_the_programs_supervisord_starts_refuse_bad_options_in_one_line(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--bogus=1"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr == "macvtapdp: error: unknown option --bogus\n"


@pytest.mark.parametrize(
    "module",
    ["macvtapdp.plugin.serve", "macvtapdp.node.reconcile", "macvtapdp.node.watchdog",
     "macvtapdp.node.metrics"],
)  # fmt: skip
def test_the_programs_supervisord_starts_import_neither_typer_nor_pydantic(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "top = {m.split('.')[0] for m in sys.modules}; "
        "bad = sorted(top & {'typer', 'pydantic', 'click'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_render_config_of_a_configuration_loads_neither_netlink_nor_grpc() -> None:
    """It works anywhere and stays light: only discovery (and `run`'s link check) list links."""
    code = (
        "import sys\n"
        "from macvtapdp.cli import main\n"
        "sys.argv = ['macvtapdp', 'render-config']\n"
        "try:\n    main()\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
        "top = {m.split('.')[0] for m in sys.modules}\n"
        "sys.exit(', '.join(sorted(top & {'pyroute2', 'grpc'})) or 0)\n"
    )
    env = {**os.environ, "DP_MACVTAP_CONF": '[{"name":"eth0","master":"eth0"}]'}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "[program:resource-eth0]" in done.stdout


@pytest.mark.parametrize(
    ("args", "env"), [(["--no-topology"], {}), ([], {"MACVTAPDP_NO_TOPOLOGY": "1"})]
)
def test_no_topology_reaches_every_resource_process(args: list[str], env: dict[str, str]) -> None:
    conf = '[{"name":"eth0","master":"eth0"}]'
    done = cli("render-config", *args, env={"DP_MACVTAP_CONF": conf, **env})
    assert done.returncode == 0, done.stderr
    [command] = [line for line in done.stdout.splitlines() if "macvtapdp.plugin" in line]
    assert "--topology=false" in command
    default = cli("render-config", env={"DP_MACVTAP_CONF": conf})
    assert "--topology=true" in default.stdout


@pytest.mark.parametrize("module", ["macvtapdp.plugin.serve", "macvtapdp.node.watchdog"])
def test_prometheus_client_is_loaded_only_where_it_is_used(module: str) -> None:
    """A resource process loads it only with metrics on (``plugin.metrics``), at run time."""
    code = f"import sys, {module}; sys.exit('prometheus_client' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_the_metrics_program_needs_an_address() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "macvtapdp.node.metrics", "--metrics-address="],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "macvtapdp: error: --metrics-address is empty: nothing to serve\n"
