"""Render the supervisord configuration: one program per resource.

Pure text, no grpc and no netlink, so ``render-config`` works anywhere.
supervisord's parser is unforgiving in three ways (platform-facts B7): a lone
``%`` aborts start-up, whitespace followed by ``;`` or ``#`` starts a comment
even inside quotes, and a newline injects new lines. So every value goes
through ``_value``: quoted for ``shlex`` (which supervisord uses to split
``command``), ``%`` doubled, and anything that could still change the file's
meaning refused.

Restart policy: a serve process retries transient problems itself, so an exit
is a bug or a kill. supervisord restarts an exited program at once; one that
dies within ``startsecs`` of starting backs off (1, 2, 3 s) and is FATAL after
``startretries``; the ``watchdog`` event listener then starts it again after a
bounded, growing delay. No resource stays down for good.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from macvtapdp import naming
from macvtapdp.config import Config, Resource
from macvtapdp.errors import RenderError

DEFAULT_RUN_DIR = "/run/macvtapdp"
RUN_DIR_VAR = "MACVTAPDP_RUN_DIR"
PROGRAM_PREFIX = "resource-"
WATCHDOG = "watchdog"
STOP_WAIT_SECONDS = 5  # SIGTERM, then SIGKILL to the whole process group
START_SECONDS = 1
START_RETRIES = 3
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]|\s[;#]")


@dataclass(frozen=True)
class Layout:
    """Where supervisord's files live (a tmpfs in the container)."""

    run_dir: str = DEFAULT_RUN_DIR

    @property
    def conf(self) -> str:
        return os.path.join(self.run_dir, "supervisord.conf")

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "supervisor.sock")

    @property
    def server_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir, "supervisord.pid")

    @property
    def programs_dir(self) -> str:
        """Program files ``reconcile`` adds and removes (discovery, config file)."""
        return os.path.join(self.run_dir, "programs.d")

    def state_file(self, name: str) -> str:
        """Where ``serve`` reports its registration for ``macvtapdp status``."""
        return os.path.join(self.run_dir, "state", f"{name}.json")


def program_name(resource: str) -> str:
    """supervisord's name for a resource's program (no ``/``, ``:`` or spaces)."""
    return PROGRAM_PREFIX + resource


def resource_of(program: str) -> str | None:
    """The resource a program serves, or None for other programs."""
    return program[len(PROGRAM_PREFIX) :] if program.startswith(PROGRAM_PREFIX) else None


def self_command() -> list[str]:
    """How to run this same macvtapdp again (console script or ``python -m``)."""
    exe = os.path.abspath(sys.argv[0])
    if os.path.basename(exe) == "macvtapdp" and os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "macvtapdp"]


def serve_argv(resource: Resource, plugin_dir: str, base: Sequence[str]) -> list[str]:
    """The full ``serve`` command line: settings explicit, visible in ``ps``."""
    return [
        *base,
        "serve",
        resource.name,
        # --key=value: a value that starts with "-" stays a value
        f"--master={resource.master}",
        f"--mode={resource.mode.value}",
        f"--capacity={resource.capacity}",
        f"--plugin-dir={plugin_dir}",
    ]


def _value(text: str) -> str:
    if _UNSAFE.search(text):
        raise RenderError(
            f"cannot write {text!r} into supervisord's configuration: control characters, "
            'or whitespace followed by ";" or "#", would change its meaning'
        )
    return text.replace("%", "%%")


def _command(argv: Iterable[str]) -> str:
    """One command line for supervisord's ``shlex.split`` (escaped by ``_section``)."""
    return shlex.join(argv)


def _section(title: str, options: Sequence[tuple[str, str | int]]) -> str:
    lines = [f"[{title}]"] + [f"{key}={_value(str(value))}" for key, value in options]
    return "\n".join(lines) + "\n"


def _logs_to_container(stream: str = "stdout") -> list[tuple[str, str | int]]:
    return [(f"{stream}_logfile", f"/dev/{stream}"), (f"{stream}_logfile_maxbytes", 0)]


def render_program(resource: Resource, plugin_dir: str, base: Sequence[str]) -> str:
    """The ``[program:resource-<name>]`` section of one resource."""
    return _section(
        f"program:{program_name(resource.name)}",
        [
            ("command", _command(serve_argv(resource, plugin_dir, base))),
            ("autostart", "true"),
            ("autorestart", "true"),
            ("startsecs", START_SECONDS),
            ("startretries", START_RETRIES),
            ("stopsignal", "TERM"),
            ("stopwaitsecs", STOP_WAIT_SECONDS),
            ("stopasgroup", "true"),
            ("killasgroup", "true"),
            *_logs_to_container(),
            ("redirect_stderr", "true"),
        ],
    )


def render(
    conf: Config,
    *,
    plugin_dir: str = naming.DEFAULT_PLUGIN_DIR,
    layout: Layout = Layout(),
    base: Sequence[str] | None = None,
    reconcile: Sequence[str] | None = None,
) -> str:
    """The complete supervisord configuration for ``conf``.

    With ``reconcile`` (the argv of a ``macvtapdp reconcile`` program, for
    discovery mode or a configuration file), resource programs live in
    ``layout.programs_dir`` where that program maintains them; otherwise they
    are written inline.
    """
    base = list(base) if base is not None else self_command()
    parts = [
        "; Rendered by `macvtapdp render-config`; rendered again at every start: do not edit.\n",
        _section(
            "supervisord",
            [
                ("nodaemon", "true"),
                ("user", "root"),
                # nodaemon echoes the activity log to stdout; a logfile too would double it
                ("logfile", "/dev/null"),
                ("logfile_maxbytes", 0),
                ("pidfile", layout.pidfile),
                ("loglevel", "info"),
            ],
        ),
        _section("unix_http_server", [("file", layout.socket), ("chmod", "0700")]),
        _section(
            "rpcinterface:supervisor",
            [("supervisor.rpcinterface_factory", "supervisor.rpcinterface:make_main_rpcinterface")],
        ),
        _section("supervisorctl", [("serverurl", layout.server_url)]),
        _section(
            f"eventlistener:{WATCHDOG}",
            [
                ("command", _command([*base, "watchdog"])),
                ("events", "PROCESS_STATE_FATAL,PROCESS_STATE_RUNNING"),
                ("autorestart", "true"),
                ("buffer_size", 100),
                ("stdout_logfile", "NONE"),  # the event protocol: keep no log file of it
                *_logs_to_container("stderr"),
            ],
        ),
    ]
    if reconcile is not None:
        parts.append(
            _section(
                "program:reconcile",
                [
                    ("command", _command(reconcile)),
                    ("autorestart", "true"),
                    ("startsecs", START_SECONDS),
                    ("startretries", START_RETRIES),
                    ("stopwaitsecs", STOP_WAIT_SECONDS),
                    *_logs_to_container(),
                    ("redirect_stderr", "true"),
                ],
            )
        )
        parts.append(_section("include", [("files", os.path.join(layout.programs_dir, "*.conf"))]))
    else:
        parts.extend(render_program(r, plugin_dir, base) for r in conf.resources)
    return "\n".join(parts)
