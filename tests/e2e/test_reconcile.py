"""End to end: discovery mode and live reconfiguration under the real supervisord.

``macvtapdp run`` in a netns with the kubelet stand-in. In discovery mode the
filters admit veth links (this kernel has no dummy or bond driver); links come
and go and their resources follow, while the other resources' processes and
kubelet streams are never touched. With a configuration file laid out as a
Kubernetes ConfigMap volume (``config.json -> ..data/config.json``, ``..data ->
..<timestamp>``, updated by an atomic rename of ``..data``), an edit restarts
exactly the resources whose settings changed, and an invalid edit changes
nothing and logs every problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness.kubelet import HEALTHY, UNHEALTHY, FakeKubelet, ResourceState
from harness.netns import NetNS
from harness.processes import (
    Node,
    macvtapdp,
    processes_mentioning,
    resource,
    short_tempdir,
    until,
)

pytestmark = pytest.mark.e2e

START_TIMEOUT = 20.0
STEP_TIMEOUT = 15.0
DISCOVERED_CAPACITY = 100  # discovery offers the default capacity
GRACE = 1.5  # --discover-grace in the discovery test (default 5 s)


def healthy(name: str, capacity: int) -> Callable[[ResourceState], bool]:
    ids = sorted(f"{name}Mvp{i}" for i in range(capacity))
    return lambda s: s.connected and sorted(s.devices) == ids and s.allocatable == capacity


@dataclass
class Setup:
    ns: NetNS
    node: Node
    started: bool = False

    @property
    def kubelet(self) -> FakeKubelet:
        return self.node.kubelet

    def start(self, *options: str) -> None:
        self.kubelet.start()
        self.node.start(*options)
        self.started = True

    def resources(self) -> set[str]:
        return {n for n in self.node.processes() if n.startswith("resource-")}

    def pids(self) -> dict[str, int]:
        """Program -> pid, once every program is RUNNING."""
        return {n: int(i["pid"]) for n, i in self.node.running(STEP_TIMEOUT).items()}

    def wait(
        self, name: str, check: Callable[[ResourceState], bool], timeout: float = STEP_TIMEOUT
    ) -> ResourceState:
        ok = self.kubelet.wait_for(resource(name), check, timeout)
        state = self.kubelet.state(resource(name))
        if not ok:
            output = "\n".join(self.node.output.lines[-60:])
            pytest.fail(f"{name}: kubelet state never matched within {timeout}s: {state}\n{output}")
        return state

    def mark(self) -> tuple[int, int]:
        """Where the container output and the kubelet's events are now."""
        return len(self.node.output.lines), len(self.kubelet.events)

    def log(self, pattern: str, since: int, timeout: float = STEP_TIMEOUT) -> str:
        found = self.node.output.wait_for(pattern, timeout, start=since)
        assert found, f"no line matching {pattern!r} in:\n{self.node.output.text()}"
        return found.string

    def events(self, name: str, since: int) -> list[str]:
        return [e.kind for e in self.kubelet.events[since:] if e.resource == resource(name)]

    def untouched(self, name: str, before: ResourceState, since: int) -> None:
        """Resource ``name`` kept its registration and stream since event ``since``."""
        state = self.kubelet.state(resource(name))
        assert state.connected and state.endpoint == before.endpoint
        assert state.register_count == before.register_count
        kinds = self.events(name, since)
        assert not {"register", "disconnected", "stream-ended", "superseded"} & set(kinds), kinds


@pytest.fixture
def setup(netns: NetNS) -> Iterator[Setup]:
    s = Setup(netns, Node(netns))
    dirs = (s.node.plugin_dir, s.node.run_dir)
    try:
        yield s
    finally:
        code = s.node.stop()
        leaked = list(processes_mentioning(*dirs))
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = s.node.output.text() if s.started else ""
        assert not leaked, f"processes left behind: {leaked}"
        assert "Traceback" not in output, output
        assert code == 0, output


# -- discovery -----------------------------------------------------------------------------


def test_discovery_follows_links_and_never_disturbs_the_others(setup: Setup) -> None:
    ns = setup.ns
    ns.veth("dv0", peer="pv0")  # peers are veths too: the include glob leaves them out
    ns.veth("dv1", peer="pv1")
    ns.veth("dvx0", peer="pvx0")  # matches the include, and the exclude
    setup.node.env["MACVTAPDP_DISCOVER_KINDS"] = "veth"  # the environment form
    setup.start("--discover-include=dv*", "--discover-exclude=dvx*", f"--discover-grace={GRACE:g}")
    for name in ("dv0", "dv1"):
        setup.wait(name, healthy(name, DISCOVERED_CAPACITY), START_TIMEOUT)
    pids = setup.pids()
    assert set(pids) == {"reconcile", "watchdog", "resource-dv0", "resource-dv1"}
    first = setup.node.output.text()
    assert "discovery mode" in first and "2 links offered: dv0, dv1" in first
    dv0 = setup.kubelet.state(resource("dv0"))
    assert dv0.register_count == 1
    line, event = setup.mark()
    since = time.monotonic()

    # a link appears: its resource is added and registers
    ns.veth("dv2", peer="pv2")
    setup.wait("dv2", healthy("dv2", DISCOVERED_CAPACITY))
    setup.log(r"\[reconcile\] added resource dv2: lower link dv2, mode bridge, 100 devices", line)
    assert "resource-dv2" in setup.pids()

    # a link goes: Unhealthy at once (its serve process), its program removed after the grace
    gone = time.monotonic()
    ns.ip("link", "del", "dv1")
    setup.log(r"\[reconcile\] link dv1 is gone: removing its resource in 1.5 s", line)
    setup.log(r"\[reconcile\] removed resource dv1 \(link dv1 gone for 1.5 s\)", line)
    assert time.monotonic() - gone >= GRACE
    assert until(lambda: setup.resources() == {"resource-dv0", "resource-dv2"}, STEP_TIMEOUT)
    assert not [f for f in os.listdir(setup.node.plugin_dir) if "_dv1@" in f]  # socket removed
    assert any(  # before its process went, it told the kubelet
        devices and set(devices.values()) == {UNHEALTHY}
        for at, devices in setup.kubelet.history(resource("dv1"))
        if at >= gone
    )
    assert "disconnected" in setup.events("dv1", event)  # then its stream ended

    # the other resource never noticed
    assert setup.pids()["resource-dv0"] == pids["resource-dv0"]
    setup.untouched("dv0", dv0, event)
    assert all(
        devices == dict.fromkeys(dv0.devices, HEALTHY)
        for at, devices in setup.kubelet.history(resource("dv0"))
        if at >= since
    )
    assert "dvx0" not in setup.node.output.text()

    ctl = setup.node.supervisorctl("status")
    listed = {line.split()[0] for line in ctl.stdout.splitlines()}
    assert listed == {"reconcile", "watchdog", "resource-dv0", "resource-dv2"}, ctl.stdout
    status = setup.node.status()
    rows = {line.split()[0] for line in status.stdout.splitlines()[1:]}
    assert rows == {"dv0", "dv2", "(reconcile)", "(watchdog)"}, status.stdout


def test_a_link_back_within_the_grace_keeps_its_process_and_stream(setup: Setup) -> None:
    setup.ns.veth("dv0", peer="pv0")
    setup.node.env.update(
        MACVTAPDP_DISCOVER_KINDS="veth",
        MACVTAPDP_DISCOVER_INCLUDE="dv*",
        MACVTAPDP_DISCOVER_GRACE="30",
    )
    setup.start()
    setup.wait("dv0", healthy("dv0", DISCOVERED_CAPACITY), START_TIMEOUT)
    pid = setup.pids()["resource-dv0"]
    before = setup.kubelet.state(resource("dv0"))
    line, event = setup.mark()

    setup.ns.ip("link", "del", "dv0")  # a driver reload: the link goes, and comes back
    setup.wait("dv0", lambda s: s.connected and s.allocatable == 0)
    setup.log(r"\[reconcile\] link dv0 is gone: removing its resource in 30 s", line)
    setup.ns.veth("dv0", peer="pv0")
    setup.wait("dv0", healthy("dv0", DISCOVERED_CAPACITY))
    setup.log(r"\[reconcile\] link dv0 is back: its resource stays", line)
    assert setup.pids()["resource-dv0"] == pid
    setup.untouched("dv0", before, event)


# -- configuration file --------------------------------------------------------------------


class ConfigMapVolume:
    """A directory laid out and updated as the kubelet does for a ConfigMap volume."""

    KEY = "config.json"

    def __init__(self) -> None:
        self.dir = short_tempdir()
        self.generation = 0
        self.path = os.path.join(self.dir, self.KEY)

    def write(self, text: str) -> None:
        """A new timestamped dir, ``..data`` swapped to it by rename, the old dir removed."""
        self.generation += 1
        stamp = f"..2026_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        os.mkdir(os.path.join(self.dir, stamp))
        with open(os.path.join(self.dir, stamp, self.KEY), "w") as fh:
            fh.write(text)
        data = os.path.join(self.dir, "..data")
        old = os.readlink(data) if os.path.islink(data) else None
        os.symlink(stamp, os.path.join(self.dir, "..data_tmp"))
        os.replace(os.path.join(self.dir, "..data_tmp"), data)
        if not os.path.lexists(self.path):
            os.symlink(os.path.join("..data", self.KEY), self.path)
        if old is not None:
            shutil.rmtree(os.path.join(self.dir, old))

    def resources(self, *items: dict[str, Any]) -> None:
        self.write(json.dumps(list(items)))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def volume() -> Iterator[ConfigMapVolume]:
    v = ConfigMapVolume()
    try:
        yield v
    finally:
        v.remove()


CAP = 4


def res(name: str, master: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "master": master, "capacity": CAP, **more}


def start_with_file(setup: Setup, volume: ConfigMapVolume, *names: str) -> dict[str, int]:
    for link in ("la", "lb", "lc", "ld"):
        setup.ns.veth(link)
    volume.resources(*(res(n, f"l{n[-1]}") for n in names))
    setup.start(f"--config-file={volume.path}")
    for name in names:
        setup.wait(name, healthy(name, CAP), START_TIMEOUT)
    pids = setup.pids()
    assert set(pids) == {"reconcile", "watchdog", *(f"resource-{n}" for n in names)}
    return pids


def test_config_file_edit_restarts_exactly_the_changed_resources(
    setup: Setup, volume: ConfigMapVolume
) -> None:
    pids = start_with_file(setup, volume, "ra", "rb", "rc")
    before = {n: setup.kubelet.state(resource(n)) for n in ("ra", "rb", "rc")}
    line, event = setup.mark()

    volume.resources(res("ra", "la"), res("rb", "lb", mode="vepa"), res("rd", "ld"))
    setup.wait("rd", healthy("rd", CAP))
    setup.wait(
        "rb",
        lambda s: s.register_count == before["rb"].register_count + 1 and healthy("rb", CAP)(s),
    )
    assert until(lambda: setup.resources() == {"resource-ra", "resource-rb", "resource-rd"}, 10)
    for pattern in (
        r"\[reconcile\] removed resource rc$",
        r"\[reconcile\] restarted resource rb: mode bridge -> vepa$",
        r"\[reconcile\] added resource rd: lower link ld, mode bridge, 4 devices$",
    ):
        setup.log(pattern, line)

    after = setup.pids()
    assert after["resource-ra"] == pids["resource-ra"]
    assert after["resource-rb"] != pids["resource-rb"]
    assert after["reconcile"] == pids["reconcile"] and after["watchdog"] == pids["watchdog"]
    setup.untouched("ra", before["ra"], event)
    assert setup.kubelet.state(resource("rb")).endpoint != before["rb"].endpoint
    assert "disconnected" in setup.events("rc", event)  # its process ended its stream
    actions = [
        text
        for text in setup.node.output.lines[line:]
        if re.search(r"\[reconcile\] (added|removed|restarted) ", text)
    ]
    assert len(actions) == 3, actions

    # the restarted resource serves with its new settings
    [container] = setup.kubelet.allocate(resource("rb"), ["rbMvp0"], 10).container_responses
    [tap] = setup.ns.macvtaps()
    assert container.devices[0].host_path == f"/dev/tap{tap['ifindex']}"
    assert tap["link"] == "lb" and tap["linkinfo"]["info_data"]["mode"] == "vepa"


def test_invalid_config_file_edit_changes_nothing_and_logs_every_problem(
    setup: Setup, volume: ConfigMapVolume
) -> None:
    pids = start_with_file(setup, volume, "ra", "rb")
    before = {n: setup.kubelet.state(resource(n)) for n in ("ra", "rb")}
    line, event = setup.mark()

    volume.write(json.dumps([res("ra", "la", mode="bogus"), {"name": "rb", "capacity": 0}]))
    path = re.escape(volume.path)
    setup.log(
        rf"ERROR \[reconcile\] invalid configuration in {path}; keeping the current one", line
    )
    for problem in (
        rf'{path}\[0\]\.mode: unknown mode "bogus"; expected one of: bridge, passthru',
        rf'{path}\[1\]\.master: is required \(or its alias "lowerDevice"\)',
        rf"{path}\[1\]\.capacity: 0 is out of range; must be between 1 and 1000",
    ):
        setup.log(rf"ERROR \[reconcile\]   {problem}", line)

    line2 = len(setup.node.output.lines)
    volume.write("[{")  # not even JSON
    setup.log(rf"ERROR \[reconcile\]   {path}: invalid JSON", line2)

    time.sleep(1.0)  # what a wrong pass would have done by now, it would have started
    assert setup.pids() == pids
    for name in ("ra", "rb"):
        setup.untouched(name, before[name], event)
    assert not [
        t
        for t in setup.node.output.lines[line:]
        if re.search(r"(added|removed|restarted) resource", t)
    ]

    # a valid edit still works afterwards
    volume.resources(res("ra", "la"), res("rb", "lb", capacity=2))
    setup.wait("rb", healthy("rb", 2))
    setup.log(r"\[reconcile\] restarted resource rb: capacity 4 -> 2$", line)
    assert setup.pids()["resource-ra"] == pids["resource-ra"]
    setup.untouched("ra", before["ra"], event)


def test_run_refuses_an_invalid_file_at_start(netns: NetNS, volume: ConfigMapVolume) -> None:
    volume.write('[{"name": "ra"}]')
    run_dir = short_tempdir()
    try:
        argv = [*macvtapdp(), "run", f"--config-file={volume.path}", f"--run-dir={run_dir}/r"]
        done = subprocess.run(netns.argv(argv), capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(run_dir)
    assert done.returncode == 2, done
    assert done.stderr == (
        f'macvtapdp: error: {volume.path}[0].master: is required (or its alias "lowerDevice")\n'
    )
