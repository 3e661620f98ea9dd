"""Render the supervisord configuration: one program per resource, and the helpers.

Pure text, no grpc and no netlink, so ``render-config`` works anywhere.
supervisord's parser is unforgiving in three ways (platform-facts B7): a lone
``%`` aborts start-up, whitespace followed by ``;`` or ``#`` starts a comment
even inside quotes, and a newline injects new lines. So every value goes
through ``_value``: quoted for ``shlex`` (which supervisord uses to split
``command``), ``%`` doubled, and anything that could still change the file's
meaning refused.

Every program gets its whole configuration on its command line
(``settings.to_argv``), so ``ps`` shows it and an unchanged resource renders a
byte-identical program. Output: supervisord's own log and every program's go
to ``/dev/stdout`` opened in append mode (``silent`` stops supervisord's
second copy to its inherited stdout), so lines stay whole in a file, a pipe
and a pod log.

Restart policy: a resource process retries transient problems itself, so an
exit is a bug or a kill. supervisord restarts an exited program at once; one
that dies within ``startsecs`` of starting backs off (1, 2, 3 s) and is FATAL
after ``startretries``; the ``watchdog`` event listener then starts it again
after a bounded, growing delay. No resource stays down for good.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from collections.abc import Sequence

from macvtapdp import settings
from macvtapdp.config import Resource
from macvtapdp.errors import RenderError
from macvtapdp.node.names import METRICS, PROGRAM_PREFIX, RECONCILE, WATCHDOG, program_name
from macvtapdp.rundir import Layout
from macvtapdp.settings import Node

STOP_WAIT_SECONDS = 5  # SIGTERM, then SIGKILL to the whole process group
START_SECONDS = 1
START_RETRIES = 3
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]|\s[;#]")


def module_argv(module: str) -> list[str]:
    """``python -m <module>`` with this interpreter (the one macvtapdp is installed in)."""
    return [sys.executable, "-m", module]


def serve_argv(node: Node, resource: Resource) -> list[str]:
    """A resource process's full command line."""
    return [*module_argv("macvtapdp.plugin"), *settings.to_argv(node.serve(resource))]


def node_argv(module: str, node: Node) -> list[str]:
    """A node-side program's full command line (it gets every setting)."""
    return [*module_argv(module), *settings.to_argv(node)]


def _value(text: str) -> str:
    if _UNSAFE.search(text):
        raise RenderError(
            f"cannot write {text!r} into supervisord's configuration: control characters, "
            'or whitespace followed by ";" or "#", would change its meaning'
        )
    return text.replace("%", "%%")


def _section(title: str, options: Sequence[tuple[str, str | int]]) -> str:
    lines = [f"[{title}]"] + [f"{key}={_value(str(value))}" for key, value in options]
    return "\n".join(lines) + "\n"


def _logs_to_container(stream: str = "stdout") -> list[tuple[str, str | int]]:
    return [(f"{stream}_logfile", f"/dev/{stream}"), (f"{stream}_logfile_maxbytes", 0)]


def _program(title: str, argv: Sequence[str], *, autostart: bool = True) -> str:
    return _section(
        title,
        [
            ("command", shlex.join(argv)),
            ("autostart", "true" if autostart else "false"),
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


def render_program(node: Node, resource: Resource) -> str:
    """The ``[program:resource-<name>]`` section of one resource."""
    return _program(f"program:{program_name(resource.name)}", serve_argv(node, resource))


def render(node: Node, resources: Sequence[Resource], layout: Layout, *, dynamic: bool) -> str:
    """The complete supervisord configuration.

    ``dynamic`` (discovery mode or a configuration file): the resources'
    programs live in ``layout.programs_dir``, where the ``reconcile`` program
    keeps them; otherwise they are written inline.
    """
    parts = [
        "; Rendered by `macvtapdp render-config`; rendered again at every start: do not edit.\n",
        _section(
            "supervisord",
            [
                ("nodaemon", "true"),
                ("user", "root"),
                # appended like every program's output; silent: no second copy to stdout
                ("logfile", "/dev/stdout"),
                ("logfile_maxbytes", 0),
                ("silent", "true"),
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
                ("command", shlex.join(node_argv("macvtapdp.node.watchdog", node))),
                ("events", "PROCESS_STATE,TICK_5"),
                ("autorestart", "true"),
                ("buffer_size", 100),
                ("stdout_logfile", "NONE"),  # the event protocol: keep no log file of it
                *_logs_to_container("stderr"),
            ],
        ),
    ]
    if node.metrics_address:
        parts.append(_program(f"program:{METRICS}", node_argv("macvtapdp.node.metrics", node)))
    if dynamic:
        parts.append(_program(f"program:{RECONCILE}", node_argv("macvtapdp.node.reconcile", node)))
        # a glob: a run dir named like "a[1]" or "b*" must match itself, and nothing else
        pattern = os.path.join(glob.escape(layout.programs_dir), f"{PROGRAM_PREFIX}*.conf")
        parts.append(_section("include", [("files", pattern)]))
    else:
        parts.extend(render_program(node, r) for r in resources)
    return "\n".join(parts)
