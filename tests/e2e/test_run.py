"""End to end: ``macvtapdp run`` under the real supervisord, in a netns, with the kubelet stand-in.

Three resources, each named after its lower link: two veths that exist, and a third whose link
does not exist yet (unless a test makes it). Times are measured with ``time.monotonic`` from
the moment of the action (the kubelet stand-in stamps its events with the same clock) and
bounded generously; the figures themselves come from the benchmark, the tests print theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness.kubelet import HEALTHY, UNHEALTHY, FakeKubelet, ResourceState
from harness.netns import NetNS
from harness.processes import (
    RESOURCE_DOMAIN,
    Node,
    macvtapdp,
    processes_mentioning,
    resource,
    rmtree,
    short_tempdir,
    until,
)

pytestmark = pytest.mark.e2e

A, B, C = "lka", "lkb", "lkc"  # resource names, and the names of their lower links
NAMES = (A, B, C)
CAPACITY = 4
CONF = json.dumps([{"name": n, "master": n, "capacity": CAPACITY} for n in NAMES])
WATCHDOG = "watchdog"
SETTLE = 1.5  # supervisord's idle loop ticks once a second
START_TIMEOUT = 20.0  # `run` to registered: ~2 s when idle (supervisord 4.3 waits 1 s itself)


def program(name: str) -> str:
    return f"resource-{name}"


def device_ids(name: str) -> list[str]:
    return [f"{name}Mvp{i}" for i in range(CAPACITY)]


def all_healthy(name: str) -> Callable[[ResourceState], bool]:
    ids = device_ids(name)
    return lambda s: s.connected and sorted(s.devices) == ids and s.allocatable == CAPACITY


def all_unhealthy(name: str) -> Callable[[ResourceState], bool]:
    """The full device list, every device Unhealthy: capacity kept, allocatable 0."""
    ids = device_ids(name)
    return lambda s: (
        s.connected and sorted(s.devices) == ids and set(s.devices.values()) == {UNHEALTHY}
    )


def registered_again(name: str, before: ResourceState) -> Callable[[ResourceState], bool]:
    """A new registration since ``before``, with every device Healthy."""
    healthy = all_healthy(name)
    return lambda s: s.register_count > before.register_count and healthy(s)


def table(stdout: str) -> dict[str, dict[str, str]]:
    """``macvtapdp status`` output: RESOURCE -> {column: cell}, cut at the header's columns."""
    head, *lines = stdout.splitlines()
    columns = ["RESOURCE", "PROCESS", "PID", "UPTIME", "SERVING", "DEVICES", "KUBELET", "SWEEP"]
    starts = [head.index(c) for c in columns] + [head.index("LOWER LINK")]
    names = [*columns, "LOWER LINK"]
    rows: dict[str, dict[str, str]] = {}
    for line in lines:
        cells = [
            line[start:end].strip()
            for start, end in zip(starts, [*starts[1:], len(line)], strict=True)
        ]
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


@dataclass
class E2E:
    ns: NetNS
    node: Node
    started: bool = False

    @property
    def kubelet(self) -> FakeKubelet:
        return self.node.kubelet

    def up(self) -> float:
        """Kubelet, then ``macvtapdp run``; every resource registered with the right health.

        The time from ``run`` to the last resource's first good snapshot.
        """
        self.kubelet.start()
        started = time.monotonic()
        self.node.start()
        self.started = True
        for name in NAMES:
            self.wait(name, self.expected(name), START_TIMEOUT)
        return max(self.first_snapshot(n, started, self.expected(n)) for n in NAMES) - started

    def expected(self, name: str) -> Callable[[ResourceState], bool]:
        return all_healthy(name) if self.ns.link(name) else all_unhealthy(name)

    def wait(
        self, name: str, check: Callable[[ResourceState], bool], timeout: float = 10.0
    ) -> ResourceState:
        ok = self.kubelet.wait_for(resource(name), check, timeout)
        state: ResourceState = self.kubelet.state(resource(name))
        assert ok, f"{name}: kubelet state never matched within {timeout}s: {state}"
        return state

    def first_snapshot(
        self, name: str, after: float, check: Callable[[ResourceState], bool]
    ) -> float:
        """When the kubelet first received a snapshot passing ``check`` after ``after``."""
        for at, devices in self.kubelet.history(resource(name)):
            if at >= after and check(ResourceState(connected=True, devices=devices)):
                return float(at)
        raise AssertionError(f"{name}: no such snapshot after {after}")

    def running(self, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        """Every program RUNNING (supervisord's view then)."""
        seen = self.node.running(timeout)
        # the listener's stdout is its protocol with supervisord: no log file of it
        assert seen[WATCHDOG]["stdout_logfile"] == ""
        return seen

    def pids(self) -> dict[str, int]:
        return {n: int(info["pid"]) for n, info in self.running().items()}

    def own_sockets(self, name: str) -> list[str]:
        prefix = f"{RESOURCE_DOMAIN}_{name}@"
        return sorted(f for f in os.listdir(self.node.plugin_dir) if f.startswith(prefix))

    def events_since(self, index: int, name: str) -> list[str]:
        return [e.kind for e in self.kubelet.events[index:] if e.resource == resource(name)]


@pytest.fixture
def e2e(netns: NetNS) -> Iterator[E2E]:
    """Links A and B (not C), and a node configured with the three resources, not started."""
    netns.veth(A)
    netns.veth(B)
    setup = E2E(netns, Node(netns, env={"DP_MACVTAP_CONF": CONF}))
    dirs = (setup.node.plugin_dir, setup.node.run_dir)
    try:
        yield setup
    finally:
        code = setup.node.stop()
        leaked = processes_mentioning(*dirs)
        for pid in leaked:  # ours: do not let a failure disturb the next tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = setup.node.output.text() if setup.started else ""
        assert not leaked, f"processes left behind: {leaked}"
        assert "Traceback" not in output, output
        if setup.started:
            assert code == 0, output


def test_three_resources_register_and_the_missing_link_turns_healthy(e2e: E2E) -> None:
    took = e2e.up()
    print(f"run -> all registered with their health: {took:.3f}s")
    for name in (A, B):
        state = e2e.kubelet.state(resource(name))
        assert state.devices == dict.fromkeys(device_ids(name), HEALTHY)
        assert state.topology == {}  # a veth has no device behind it: no NUMA node
    missing = e2e.kubelet.state(resource(C))
    assert missing.devices == dict.fromkeys(device_ids(C), UNHEALTHY)
    assert missing.capacity == CAPACITY and missing.allocatable == 0
    pids = e2e.pids()
    accepted = [r.resource_name for r in e2e.kubelet.registrations if r.error is None]
    assert sorted(accepted) == sorted(resource(n) for n in NAMES)

    created = time.monotonic()
    e2e.ns.veth(C)
    state = e2e.wait(C, all_healthy(C))
    print(
        f"link created -> Healthy: {e2e.first_snapshot(C, created, all_healthy(C)) - created:.3f}s"
    )
    assert state.endpoint == missing.endpoint and state.register_count == 1
    assert e2e.pids() == pids
    assert all(e2e.kubelet.state(resource(n)).register_count == 1 for n in NAMES)


def test_killed_resource_is_restarted_and_the_others_never_notice(e2e: E2E) -> None:
    e2e.up()
    pids = e2e.pids()  # all RUNNING: an exit now is restarted at once, without backoff
    # A kill in steady state, as in production: right after the RUNNING transitions the
    # watchdog's event traffic keeps waking supervisord's loop, which hides its 1 s ticks.
    time.sleep(SETTLE)
    before = {n: e2e.kubelet.state(resource(n)) for n in NAMES}
    marker = len(e2e.kubelet.events)

    killed = time.monotonic()
    os.kill(pids[program(B)], signal.SIGKILL)
    again = e2e.wait(B, registered_again(B, before[B]))
    [connected] = [
        e.time
        for e in e2e.kubelet.events[marker:]
        if e.resource == resource(B) and e.kind == "connected"
    ]
    healthy = e2e.first_snapshot(B, killed, all_healthy(B))
    print(
        f"kill -9 -> registered again: {connected - killed:.3f}s, Healthy: {healthy - killed:.3f}s"
    )
    assert connected - killed < 2.0
    assert healthy - killed < 2.0
    assert again.register_count == before[B].register_count + 1
    assert again.endpoint != before[B].endpoint
    assert e2e.own_sockets(B) == [again.endpoint]  # the killed one's socket was cleaned up
    assert "disconnected" in e2e.events_since(marker, B)

    now = e2e.pids()
    assert now[program(B)] != pids[program(B)]
    for name in (A, C):
        assert now[program(name)] == pids[program(name)]
        state = e2e.kubelet.state(resource(name))
        assert state.connected and state.stopped_at is None
        assert state.register_count == before[name].register_count
        assert state.endpoint == before[name].endpoint
        assert state.devices == before[name].devices
        # the kubelet records a broken stream as "disconnected" (or "stream-ended")
        broken = {"disconnected", "stream-ended", "connected", "superseded"}
        assert not broken & set(e2e.events_since(marker, name)), e2e.kubelet.events
        assert all(
            devices == before[name].devices
            for at, devices in e2e.kubelet.history(resource(name))
            if at >= killed
        )


class CrashLoop(threading.Thread):
    """Kills every process of ``program`` as soon as supervisord reports its pid, until FATAL."""

    def __init__(self, node: Node, program: str, timeout: float = 30.0) -> None:
        super().__init__(name=f"crash-loop {program}", daemon=True)
        self.node = node
        self.program = program
        self.timeout = timeout
        self.killed: list[int] = []
        self.states: list[str] = []
        self.fatal_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:
            self.error = err

    def _loop(self) -> None:
        deadline = time.monotonic() + self.timeout
        with self.node.supervisor() as rpc:
            while time.monotonic() < deadline:
                info = rpc.call("getProcessInfo", self.program)
                state, pid = str(info["statename"]), int(info["pid"])
                if not self.states or self.states[-1] != state:
                    self.states.append(state)
                if state == "FATAL":
                    self.fatal_at = time.monotonic()
                    return
                if pid and pid not in self.killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                time.sleep(0.01)


def test_crash_loop_ends_fatal_and_the_watchdog_brings_it_back(e2e: E2E) -> None:
    e2e.up()
    pids = e2e.pids()
    before = {n: e2e.kubelet.state(resource(n)) for n in NAMES}
    loop = CrashLoop(e2e.node, program(B))
    loop.start()

    assert until(lambda: "BACKOFF" in loop.states or not loop.is_alive(), 20, 0.01)
    backoff = e2e.node.status()
    assert backoff.returncode == 3, backoff
    assert table(backoff.stdout)[B]["PROCESS"] != "RUNNING", backoff.stdout

    loop.join(40)
    assert loop.error is None and loop.fatal_at is not None, (loop.error, loop.states)
    assert loop.states[-1] == "FATAL" and "BACKOFF" in loop.states, loop.states
    fatal = e2e.node.status()
    rows = table(fatal.stdout)
    assert fatal.returncode == 3, fatal
    assert rows[B]["PROCESS"] in ("FATAL", "STARTING"), fatal.stdout  # watchdog: after 5 s
    assert rows[B]["SERVING"] == "no"
    assert all(rows[n]["PROCESS"] == "RUNNING" for n in (A, C)), fatal.stdout

    back = e2e.wait(B, registered_again(B, before[B]), 20)
    registered = max(r.time for r in e2e.kubelet.registrations if r.resource_name == resource(B))
    now = e2e.running()
    print(
        f"crash loop: {len(loop.killed)} kills, states {loop.states}; FATAL -> registered "
        f"again {registered - loop.fatal_at:.3f}s, RUNNING {time.monotonic() - loop.fatal_at:.3f}s"
    )
    assert registered - loop.fatal_at < 15.0
    assert back.endpoint != before[B].endpoint
    assert e2e.node.output.wait_for(
        rf"\[{WATCHDOG}\] {program(B)}:{program(B)} has been FATAL for 5 s; starting it again"
    )
    assert int(now[program(B)]["pid"]) not in loop.killed
    for name in (A, C):
        assert int(now[program(name)]["pid"]) == pids[program(name)]
        state = e2e.kubelet.state(resource(name))
        assert state.register_count == before[name].register_count and state.stopped_at is None
    done = e2e.node.status()
    assert done.returncode == 0, done


def test_supervisorctl_and_status_report_every_resource(e2e: E2E) -> None:
    e2e.up()
    pids = e2e.pids()

    ctl = e2e.node.supervisorctl("status")
    assert ctl.returncode == 0, ctl
    lines = [line.split() for line in ctl.stdout.splitlines()]
    assert sorted(line[0] for line in lines) == sorted([*map(program, NAMES), WATCHDOG])
    assert all(line[1] == "RUNNING" for line in lines), ctl.stdout

    shown = e2e.node.status()
    assert shown.returncode == 0, shown
    rows = table(shown.stdout)
    assert sorted(rows) == sorted([*NAMES, f"({WATCHDOG})"]), shown.stdout
    for name in NAMES:
        row = rows[name]
        assert row["PROCESS"] == "RUNNING" and row["PID"] == str(pids[program(name)])
        assert row["SERVING"] == "yes" and row["KUBELET"] == "registered", shown.stdout
    for name in (A, B):
        assert rows[name]["DEVICES"] == f"{CAPACITY}/{CAPACITY} healthy"
        assert rows[name]["LOWER LINK"] == "up"
    assert rows[C]["DEVICES"] == f"0/{CAPACITY} healthy"
    assert rows[C]["LOWER LINK"] == "missing"
    assert rows[f"({WATCHDOG})"]["PROCESS"] == "RUNNING"
    assert e2e.node.status("--alive").returncode == 0

    before = e2e.kubelet.state(resource(A))
    stopped = e2e.node.supervisorctl("stop", program(A))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
    e2e.wait(A, lambda s: not s.connected and s.allocatable == 0 and s.capacity == CAPACITY)
    down = e2e.node.status()
    assert down.returncode == 3, down
    rows = table(down.stdout)
    assert rows[A]["PROCESS"] == "STOPPED" and rows[A]["SERVING"] == "no", down.stdout
    assert all(rows[n]["PROCESS"] == "RUNNING" for n in (B, C)), down.stdout
    assert e2e.node.status("--alive").returncode == 0
    assert e2e.node.supervisorctl("status").returncode == 3

    started = e2e.node.supervisorctl("start", program(A))
    assert started.returncode == 0 and "started" in started.stdout, started
    e2e.wait(A, registered_again(A, before))
    up = e2e.node.status()
    assert up.returncode == 0, up
    assert table(up.stdout)[A]["DEVICES"] == f"{CAPACITY}/{CAPACITY} healthy"


def test_sigterm_stops_everything_and_removes_every_socket(e2e: E2E) -> None:
    e2e.up()
    e2e.running()
    time.sleep(SETTLE)  # steady state (see the kill test)
    assert e2e.node.proc is not None
    plugin_dir, run_dir = e2e.node.plugin_dir, e2e.node.run_dir

    sent = time.monotonic()
    e2e.node.proc.popen.send_signal(signal.SIGTERM)
    code = e2e.node.proc.wait(10)
    took = time.monotonic() - sent
    print(f"SIGTERM -> supervisord exited: {took:.3f}s")
    assert code == 0
    assert took < 10.0
    assert os.listdir(plugin_dir) == ["kubelet.sock"]
    assert not os.path.exists(os.path.join(run_dir, "supervisor.sock"))
    assert not os.listdir(os.path.join(run_dir, "state"))  # every serve removed its state file
    assert processes_mentioning(plugin_dir, run_dir) == {}
    for name in NAMES:
        e2e.wait(name, lambda s: not s.connected and s.allocatable == 0 and s.capacity == CAPACITY)
        assert e2e.node.output.wait_for(rf"\[{name}\] stopped; socket removed", 0)
    assert e2e.node.status("--alive").returncode == 4


@pytest.mark.parametrize(
    ("conf", "problems"),
    [
        pytest.param(
            "[{",
            ["DP_MACVTAP_CONF: invalid JSON: "],
            id="invalid-json",
        ),
        pytest.param(
            json.dumps(
                [
                    {"name": "a b", "master": "x"},
                    {"name": "ok", "master": "ok", "mode": "weird"},
                    {"name": "dup", "master": "y"},
                    {"name": "dup", "lowerDevice": "z"},
                    {"name": "big", "master": "w", "capacity": 0, "colour": "red"},
                ]
            ),
            [  # in the order reported: each element's problems, then those across elements
                "DP_MACVTAP_CONF[0].name: ",
                "DP_MACVTAP_CONF[1].mode: ",
                "DP_MACVTAP_CONF[4]: unknown key ",
                "DP_MACVTAP_CONF[4].capacity: ",
                "DP_MACVTAP_CONF[3].name: duplicate name ",
            ],
            id="several-problems",
        ),
    ],
)
def test_invalid_configuration_exits_2_and_starts_nothing(
    netns: NetNS, conf: str, problems: list[str]
) -> None:
    plugin_dir = short_tempdir()
    run_dir = os.path.join(short_tempdir(), "run")
    try:
        argv = [*macvtapdp(), "run", f"--plugin-dir={plugin_dir}", f"--run-dir={run_dir}"]
        done = subprocess.run(
            netns.argv(argv),
            env={**os.environ, "DP_MACVTAP_CONF": conf},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == len(problems), done.stderr
        for line, problem in zip(sorted(lines), sorted(problems), strict=True):
            assert line.startswith(f"macvtapdp: error: {problem}"), done.stderr
        assert "Traceback" not in done.stderr
        assert not os.path.exists(run_dir)  # no supervisord.conf, so no supervisord
        assert processes_mentioning(plugin_dir, run_dir) == {}
    finally:
        rmtree(plugin_dir)
        rmtree(os.path.dirname(run_dir))


SUPERVISORD_LOG = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (CRIT|ERRO|WARN|INFO) "
    r"(Set uid to user 0 succeeded"
    r"|RPC interface 'supervisor' initialized"
    r"|Server 'unix_http_server' running without any HTTP authentication checking"
    r"|supervisord started with pid \d+"
    r"|spawned: '[\w-]+' with pid \d+"
    r"|success: [\w-]+ entered RUNNING state, .*"
    r"|received SIGTERM indicating exit request"
    r"|waiting for [\w, -]+ to die"
    r"|stopped: [\w-]+ \(.*\))$"
)
TAGGED_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[([\w.-]+)\] .+")


def test_every_line_is_attributed_and_supervisord_lines_are_single(e2e: E2E) -> None:
    e2e.up()
    e2e.running()
    e2e.ns.veth(C)
    e2e.wait(C, all_healthy(C))
    e2e.ns.ip("link", "set", A, "down")
    e2e.wait(A, all_unhealthy(A))
    e2e.ns.ip("link", "set", A, "up")
    e2e.wait(A, all_healthy(A))
    assert e2e.node.stop() == 0
    lines = e2e.node.output.lines

    assert lines[0].startswith(f"macvtapdp: 3 resources from DP_MACVTAP_CONF: {A}, {B}, {C};")
    # run says, once per resource, which lower link is missing (a NIC may come later)
    assert lines[1] == (
        f"macvtapdp: warning: resource {C}: lower link {C} does not exist; its devices stay "
        "Unhealthy until it appears"
    )
    tags: dict[str, list[str]] = {}
    ours: list[str] = []
    for line in lines[2:]:
        if tagged := TAGGED_LOG.fullmatch(line):
            tags.setdefault(tagged[1], []).append(line)
        else:
            assert SUPERVISORD_LOG.fullmatch(line), f"a line nobody owns: {line!r}"
            ours.append(line)
    assert set(tags) <= {*NAMES, WATCHDOG}, sorted(tags)
    for name in NAMES:
        said = "\n".join(tags.get(name, []))
        for message in (
            f"serving {resource(name)}: {CAPACITY} devices",
            f"registered {resource(name)} with the kubelet",
            "stopped; socket removed",
        ):
            assert said.count(message) == 1, said
    assert "lower link lkc is missing" in "\n".join(tags[C])
    assert "lower link lka is down (admin)" in "\n".join(tags[A])

    assert len(ours) == len(set(ours)), "doubled supervisord lines"
    assert sum("supervisord started with pid" in line for line in ours) == 1
    for name in NAMES:
        assert sum(f"spawned: '{program(name)}'" in line for line in ours) == 1
        assert sum(f"stopped: {program(name)} (exit status 0)" in line for line in ours) == 1


def test_kubelet_restart_reregisters_every_resource_promptly(e2e: E2E) -> None:
    e2e.ns.veth(C)
    e2e.up()
    pids = e2e.pids()
    before = {n: e2e.kubelet.state(resource(n)) for n in NAMES}

    called = time.monotonic()
    e2e.kubelet.restart()
    [started] = [e.time for e in e2e.kubelet.events if e.kind == "kubelet-start"][-1:]
    for name in NAMES:
        state = e2e.wait(name, registered_again(name, before[name]))
        assert state.endpoint != before[name].endpoint
        assert e2e.own_sockets(name) == [state.endpoint]
    healthy = max(e2e.first_snapshot(n, started, all_healthy(n)) for n in NAMES)
    print(
        f"kubelet restart -> all re-registered and Healthy: {healthy - started:.3f}s after the "
        f"new kubelet.sock ({healthy - called:.3f}s after restart() was called)"
    )
    assert healthy - started < 2.0
    assert e2e.pids() == pids  # nothing restarted: each process registered again by itself
