"""``macvtapdp run > file``: every line whole, as in a pipe and a pod log.

A shell's ``>`` opens a regular file without O_APPEND, and supervisord opens
``/dev/stdout`` again for its log and for every program: writers at their own
offsets overwrite each other unless every one of them appends. This runs the
real ``run`` with its output in such a file, makes every kind of writer speak
(supervisord, each resource, the reconciler and the watchdog, the control
socket's clients: ``status``, ``status --alive`` and supervisorctl), and reads
the file back.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.kubelet import FakeKubelet
from harness.netns import NetNS
from harness.processes import (
    all_healthy,
    macvtapdp,
    processes_mentioning,
    resource,
    rmtree,
    short_tempdir,
    until,
)

pytestmark = pytest.mark.e2e

NAMES = ("lka", "lkb")
CAPACITY = 2
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
LINE = re.compile(
    r"macvtapdp: .+"  # run itself, before supervisord
    rf"|{STAMP}[A-Z]+ \[(lka|lkb|reconcile|watchdog)\] .+"  # our programs
    rf"|{STAMP}(CRIT|ERRO|WARN|INFO) "  # supervisord
    r"(Included extra file \"[^\"]+\" during parsing|Set uid to user 0 succeeded"
    r"|RPC interface 'supervisor' initialized"
    r"|Server 'unix_http_server' running without any HTTP authentication checking"
    r"|supervisord started with pid \d+|spawned: '[\w-]+' with pid \d+"
    r"|success: [\w-]+ entered RUNNING state, .+|received SIGTERM indicating exit request"
    r"|waiting for [\w, -]+ to die|stopped: [\w-]+ \(exit status 0\))"
)


@pytest.fixture
def dirs() -> Iterator[tuple[str, str, str]]:
    made = (short_tempdir(), short_tempdir(), short_tempdir())
    try:
        yield made
    finally:
        for path in made:
            rmtree(path)


def test_output_redirected_to_a_file_keeps_every_line_whole(
    netns: NetNS, dirs: tuple[str, str, str]
) -> None:
    plugin_dir, run_dir, out_dir = dirs
    for name in NAMES:
        netns.veth(name)
    conf = Path(out_dir) / "conf.json"
    conf.write_text(json.dumps([{"name": n, "master": n, "capacity": CAPACITY} for n in NAMES]))
    kubelet = FakeKubelet(plugin_dir)
    kubelet.start()
    out = Path(out_dir) / "run.out"
    argv = [
        *macvtapdp(), "run", f"--plugin-dir={plugin_dir}", f"--run-dir={run_dir}",
        f"--config-file={conf}", "--metrics-address=",
    ]  # fmt: skip
    with open(out, "w", encoding="utf-8") as fh:  # O_WRONLY|O_CREAT|O_TRUNC, as `>`
        assert not fcntl.fcntl(fh.fileno(), fcntl.F_GETFL) & os.O_APPEND
        run = subprocess.Popen(
            netns.argv(argv), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        for name in NAMES:
            assert kubelet.wait_for(resource(name), all_healthy(CAPACITY), 20.0)
        status = [*macvtapdp(), "status", f"--run-dir={run_dir}"]
        # what supervisord itself writes to the descriptor it got appends too
        with open(f"/proc/{run.pid}/fdinfo/1", encoding="ascii") as info:
            flags = next(int(v, 8) for k, v in (line.split() for line in info) if k == "flags:")
        assert flags & os.O_APPEND
        ready = lambda: subprocess.run(status, capture_output=True, timeout=30).returncode == 0  # noqa: E731
        assert until(ready, 15.0, 0.2)  # every program RUNNING (past startsecs)
        ctl = os.path.join(os.path.dirname(sys.executable), "supervisorctl")
        for command in (
            status,
            [*status, "--alive"],
            [ctl, "-c", os.path.join(run_dir, "supervisord.conf"), "status"],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done
        # the reconciler speaks: a resource removed from the file
        conf.write_text(json.dumps([{"name": NAMES[0], "master": NAMES[0], "capacity": 2}]))
        assert until(lambda: "removed resource lkb" in out.read_text(errors="replace"), 10)
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(20)
        kubelet.stop()
    assert code == 0
    assert processes_mentioning(plugin_dir, run_dir) == {}

    text = out.read_text(encoding="utf-8", errors="replace")
    assert "\0" not in text  # a writer behind the end would leave a hole of NULs
    lines = text.splitlines()
    broken = [line for line in lines if not LINE.fullmatch(line)]
    assert not broken, "\n".join(broken)
    for needle in (
        "macvtapdp: 2 resources from " + str(conf),
        "supervisord started with pid",
        "[lka] serving macvtap.network.kubevirt.io/lka",
        "[lkb] serving macvtap.network.kubevirt.io/lkb",
        "[lka] registered macvtap.network.kubevirt.io/lka with the kubelet",
        "[reconcile] removed resource lkb",
        "[lka] stopped; socket removed",
        "stopped: resource-lka (exit status 0)",
    ):
        assert sum(needle in line for line in lines) == 1, (needle, text)
