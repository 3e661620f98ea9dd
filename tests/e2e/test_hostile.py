"""A hostile node (issue 10): ``macvtapdp run`` under the real supervisord, attacked.

Each test plays one thing an attacker or a careless operator did to the running plugin and
checks that it ends as it must: nothing foreign is run or written through, nothing freezes,
nothing stays down, and every refusal is one line. Two resources, ``lka`` and ``lkb``, each on
a veth of its name, with the kubelet stand-in, in a fresh network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from harness.kubelet import UNHEALTHY, FakeKubelet, ResourceState
from harness.netns import NetNS
from harness.processes import (
    Node,
    macvtapdp,
    processes_mentioning,
    resource,
    rmtree,
    short_tempdir,
    tgkill,
    threads_taking,
    until,
)
from macvtapdp.api.v1beta1 import api_pb2, api_pb2_grpc
from tests.e2e.test_reconcile import ConfigMapVolume
from tests.e2e.test_run import CrashLoop, table

pytestmark = pytest.mark.e2e

A, B = "lka", "lkb"  # resource names, and the names of their lower links
CAP = 4
START_TIMEOUT = 20.0
STEP_TIMEOUT = 15.0


def res(name: str, master: str | None = None, **more: Any) -> dict[str, Any]:
    return {"name": name, "master": master or name, "capacity": CAP, **more}


CONF = json.dumps([res(A), res(B)])


def ids(name: str, capacity: int = CAP) -> list[str]:
    return [f"{name}Mvp{i}" for i in range(capacity)]


def healthy(name: str, capacity: int = CAP) -> Callable[[ResourceState], bool]:
    want = sorted(ids(name, capacity))
    return lambda s: s.connected and sorted(s.devices) == want and s.allocatable == capacity


def unhealthy(name: str) -> Callable[[ResourceState], bool]:
    want = sorted(ids(name))
    return lambda s: (
        s.connected and sorted(s.devices) == want and set(s.devices.values()) == {UNHEALTHY}
    )


def one_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """``done`` failed as a user mistake must: exit 2, one ``macvtapdp: error:`` line."""
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("macvtapdp: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], done.stderr
    return lines[0]


def tree(path: str) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under ``path``: relative name -> (inode, mode, size, mtime in ns)."""
    found: dict[str, tuple[int, int, int, int]] = {}
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            full = os.path.join(root, name)
            st = os.lstat(full)
            found[os.path.relpath(full, path)] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return found


@dataclass
class Host:
    """A node under attack: ``macvtapdp run`` (not started yet) and its kubelet."""

    ns: NetNS
    node: Node
    volume: ConfigMapVolume
    started: bool = False
    exit_code: int | None = 0  # what supervisord must exit with at the end (None: any)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def kubelet(self) -> FakeKubelet:
        return self.node.kubelet

    def start(self, *options: str, names: tuple[str, ...] = (A, B), cwd: str | None = None) -> None:
        """Kubelet, then ``run``; wait until every resource named is Healthy and has said so
        (the kubelet can see the devices before the process logs its registration)."""
        if not self.kubelet.running:
            self.kubelet.start()
        self.node.start(*options, cwd=cwd)
        self.started = True
        for name in names:
            self.wait(name, healthy(name), START_TIMEOUT)
            self.log(rf"\[{name}\] registered {re.escape(resource(name))} with the kubelet")

    def start_with_file(self, *items: dict[str, Any], cwd: str | None = None) -> None:
        """``run --config-file`` on a ConfigMap-like volume holding ``items``."""
        self.node.env.pop("DP_MACVTAP_CONF", None)
        self.volume.resources(*items)
        names = tuple(i["name"] for i in items)
        self.start(f"--config-file={self.volume.path}", names=names, cwd=cwd)

    def wait(
        self, name: str, check: Callable[[ResourceState], bool], timeout: float = STEP_TIMEOUT
    ) -> ResourceState:
        ok = self.kubelet.wait_for(resource(name), check, timeout)
        state = self.kubelet.state(resource(name))
        if not ok:
            tail = "\n".join(self.node.output.lines[-40:])
            pytest.fail(f"{name}: kubelet state never matched within {timeout}s: {state}\n{tail}")
        return state

    def mark(self) -> int:
        return len(self.node.output.lines)

    def log(self, pattern: str, since: int = 0, timeout: float = STEP_TIMEOUT) -> str:
        found = self.node.output.wait_for(pattern, timeout, start=since)
        assert found, f"no line matching {pattern!r} in:\n{self.node.output.text()}"
        return found.string

    def run(
        self, *options: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Another ``macvtapdp run`` in the namespace (one that should refuse), to its end."""
        argv = [*macvtapdp(), "run", "--metrics-address=", *options]
        return subprocess.run(
            self.ns.argv(argv),
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
        )

    def allocate(self, name: str, dev: str) -> str:
        [container] = self.kubelet.allocate(resource(name), [dev], timeout=10).container_responses
        [spec] = container.devices
        return spec.host_path

    def socket(self, name: str) -> str:
        endpoint = self.kubelet.state(resource(name)).endpoint
        assert endpoint is not None
        return os.path.join(self.node.plugin_dir, endpoint)

    def pids(self) -> dict[str, int]:
        return {n: int(i["pid"]) for n, i in self.node.running(STEP_TIMEOUT).items()}

    def supervisord(self) -> int:
        """supervisord's pid (``ip netns exec`` and ``run`` exec'd into it)."""
        assert self.node.proc is not None
        pid = self.node.proc.pid
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            assert b"macvtapdp.node.supervise" in fh.read()
        return pid


@pytest.fixture
def host(netns: NetNS) -> Iterator[Host]:
    netns.veth(A)
    netns.veth(B)
    h = Host(netns, Node(netns, env={"DP_MACVTAP_CONF": CONF}), ConfigMapVolume())
    dirs = (h.node.plugin_dir, h.node.run_dir)
    try:
        yield h
    finally:
        with contextlib.suppress(ProcessLookupError):
            if h.node.proc is not None:
                os.kill(h.node.proc.pid, signal.SIGCONT)  # a test may have stopped it
        code = h.node.stop()
        leaked = processes_mentioning(*dirs)
        for pid in leaked:  # do not let a failure disturb the next tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for cleanup in reversed(h.cleanups):
            cleanup()
        h.volume.remove()
        output = h.node.output.text() if h.started else ""
        assert not leaked, f"processes left behind: {leaked}"
        assert "Traceback" not in output, output
        if h.started and h.exit_code is not None:
            assert code == h.exit_code, output


def mount_tmpfs(host: Host, path: str, size: str) -> None:
    """A tmpfs of ``size`` at ``path`` (0700), unmounted once the node is gone."""
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True
    )

    def unmount() -> None:
        subprocess.run(["umount", "-l", path], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(path)

    host.cleanups.append(unmount)


def fill(directory: str) -> None:
    """Write into ``directory`` until its filesystem is full."""
    chunk = b"\0" * 4096
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


# -- 3. the run directory is not trusted --------------------------------------------------------


@pytest.mark.parametrize("kind", ["world-writable", "someone-elses", "symlink"])
def test_run_refuses_a_run_dir_it_cannot_trust_and_writes_nothing_into_it(
    host: Host, kind: str
) -> None:
    base = short_tempdir()
    host.cleanups.append(lambda: rmtree(base))
    target = os.path.join(base, "real")
    os.mkdir(target, 0o700)
    run_dir = os.path.join(base, "run")
    if kind == "symlink":
        os.symlink(target, run_dir)
    else:
        os.mkdir(run_dir)
        if kind == "world-writable":
            os.chmod(run_dir, 0o777)
        else:
            os.chown(run_dir, 65534, 65534)
    before = (tree(base), stat.S_IMODE(os.lstat(run_dir).st_mode))

    done = host.run(
        f"--plugin-dir={host.node.plugin_dir}", f"--run-dir={run_dir}", env=host.node.env
    )

    why = {
        "world-writable": "can be written by others (mode 0777)",
        "someone-elses": "is owned by uid 65534",
        "symlink": "is a symlink",
    }[kind]
    one_error(done, f"run directory {run_dir}: {why}")
    assert (tree(base), stat.S_IMODE(os.lstat(run_dir).st_mode)) == before
    assert processes_mentioning(run_dir, target) == {}


def test_planted_program_files_and_symlinks_never_survive_into_a_run(host: Host) -> None:
    run_dir = host.node.run_dir
    victim = short_tempdir()
    host.cleanups.append(lambda: rmtree(victim))
    marker = os.path.join(victim, "evil-ran")
    os.makedirs(os.path.join(run_dir, "programs.d"), mode=0o700)
    for planted in ("evil.conf", "resource-evil.conf"):  # the second matches the include
        with open(os.path.join(run_dir, "programs.d", planted), "w") as fh:
            fh.write(f"[program:{planted[:-5]}]\ncommand=touch {marker}\nautostart=true\n")
    os.symlink(victim, os.path.join(run_dir, "state"))  # where every resource writes
    os.symlink(victim, os.path.join(run_dir, "taps"))
    os.symlink(victim, os.path.join(run_dir, "metrics"))

    host.start_with_file(res("ra", A), res("rb", B))
    host.allocate("ra", "raMvp0")  # writes the taps record
    host.ns.ip("link", "set", A, "down")  # writes ra's state file
    host.wait("ra", unhealthy("ra"))
    time.sleep(1.0)  # the taps record is written within 0.2 s; a planted program starts at once

    programs = set(host.node.running(STEP_TIMEOUT))
    assert programs == {"resource-ra", "resource-rb", "reconcile", "watchdog"}
    assert not os.path.exists(marker)
    assert os.listdir(victim) == []
    for sub in ("programs.d", "state", "taps", "metrics"):
        st = os.lstat(os.path.join(run_dir, sub))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, sub
    assert sorted(os.listdir(os.path.join(run_dir, "programs.d"))) == [
        "resource-ra.conf",
        "resource-rb.conf",
    ]
    assert sorted(os.listdir(os.path.join(run_dir, "state"))) == ["ra.json", "rb.json"]
    assert os.listdir(os.path.join(run_dir, "taps")) == ["ra.json"]
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700


def test_symlinks_at_the_old_predictable_temp_names_redirect_no_write(host: Host) -> None:
    """The old ``<path>.<pid>.tmp`` names, planted for the very processes that write."""
    host.start_with_file(res("ra", A), res("rb", B))
    pids = host.pids()
    victim = os.path.join(short_tempdir(), "victim")
    host.cleanups.append(lambda: rmtree(os.path.dirname(victim)))
    with open(victim, "w") as fh:
        fh.write("precious\n")
    run_dir = host.node.run_dir
    plants = [
        (os.path.join(run_dir, "state", "ra.json"), pids["resource-ra"]),
        (os.path.join(run_dir, "taps", "ra.json"), pids["resource-ra"]),
        (os.path.join(run_dir, "programs.d", "resource-rc.conf"), pids["reconcile"]),
        (os.path.join(run_dir, "programs.d", "resource-rb.conf"), pids["reconcile"]),
    ]
    for path, pid in plants:
        os.symlink(victim, f"{path}.{pid}.tmp")
    since = host.mark()

    host.allocate("ra", "raMvp1")
    host.ns.ip("link", "set", A, "down")
    host.wait("ra", unhealthy("ra"))
    host.volume.resources(res("ra", A), res("rb", B, capacity=2), res("rc", A))
    host.wait("rc", unhealthy("rc"))  # on lka, which is down
    host.wait("rb", healthy("rb", 2))
    host.log(r"\[reconcile\] restarted resource rb: capacity 4 -> 2$", since)
    assert until(lambda: os.path.exists(os.path.join(run_dir, "taps", "ra.json")), 5)

    with open(victim) as fh:
        assert fh.read() == "precious\n"
    with open(os.path.join(run_dir, "state", "ra.json")) as fh:
        assert json.load(fh)["link"] == "down (admin)"  # written, through a fresh temp file
    for path, _pid in plants:
        assert stat.S_ISREG(os.lstat(path).st_mode), path


# -- 4. device IDs are untrusted text -----------------------------------------------------------

TAGGED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[([\w.-]+)\] ")


def test_a_newline_in_a_device_id_cannot_forge_another_resources_log_line(host: Host) -> None:
    host.start()
    forged = f"2026-01-01 00:00:00,000 INFO [{B}] allocated {B}Mvp0: /dev/tap1 (created in 1 ms)"
    since = host.mark()

    for call in (
        lambda: host.kubelet.allocate(resource(A), [f"{A}Mvp0\n{forged}"], timeout=10),
        lambda: host.kubelet.pre_start(resource(A), [f"{A}Mvp1\r\n{forged}"], timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "\n" not in (refused.value.details() or "")
    host.log(rf"\[{A}\] refused Allocate: unknown device IDs .*\\n2026-01-01", since)
    host.log(rf"\[{A}\] refused PreStartContainer: unknown device IDs .*\\r\\n2026-01-01", since)

    lines = [line for line in host.node.output.lines[since:] if "2026-01-01" in line]
    tags = [found.group(1) if (found := TAGGED.match(line)) else None for line in lines]
    assert tags == [A, A], lines  # the forged text is only inside the refusing resource's lines
    assert all("refused" in line for line in lines), lines


def test_huge_device_ids_are_refused_with_one_status_and_a_bounded_log(host: Host) -> None:
    host.start()
    since = host.mark()
    cases = [  # (IDs asked, the status they get)
        (["x" * 800_000] * 5, grpc.StatusCode.RESOURCE_EXHAUSTED),  # 4 MB: over the 1 MiB limit
        (["y" * (2 << 20)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        (["z" * 200_000] * 4, grpc.StatusCode.NOT_FOUND),  # 0.8 MB: taken, and refused
        ([f"{A}Mvp0", "w" * 1_000_000], grpc.StatusCode.NOT_FOUND),
    ]
    for asked, code in cases:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as refused:
                host.kubelet.allocate(resource(A), asked, timeout=30)
            err = refused.value
            assert err.code() == code, err
            assert len(err.details() or "") < 1000
    host.log(rf"\[{A}\] refused Allocate: .*\"w{{64}}\"\.\.\. \(999936 more characters\)", since)
    time.sleep(0.5)  # every line written by now

    said = [line for line in host.node.output.lines[since:] if f"[{A}] " in line]
    lines = [line for line in said if "sweep" not in line]  # its first round may come now
    written = sum(len(line) + 1 for line in lines)
    print(f"20 refused requests of 0.8-4 MB: {len(lines)} log lines, {written} bytes")
    assert len(lines) == 10 and written < 4000, lines  # one per request that got through
    assert all(" refused Allocate: unknown device IDs " in line for line in lines), lines
    assert not host.ns.macvtaps()
    assert host.allocate(A, f"{A}Mvp0").startswith("/dev/tap")  # still serving


# -- 5, 6. a log nobody reads, a supervisord that does not answer -------------------------------


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) for the block: it reads no pipe and answers no call."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_stopped_supervisord_freezes_neither_allocate_nor_health(host: Host) -> None:
    host.start()
    host.pids()
    refused = 0
    with stopped(host.supervisord()):
        # far more lines than the pipe to supervisord (64 KiB) and the log queue hold
        for i in range(100):
            assert host.allocate(A, f"{A}Mvp{i % CAP}").startswith("/dev/tap")
        for i in range(2000):
            with pytest.raises(grpc.RpcError) as err:
                host.kubelet.allocate(resource(A), [f"nope{i}"], timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            refused += 1
        host.ns.ip("link", "set", A, "down")
        host.wait(A, unhealthy(A))
        host.ns.ip("link", "set", A, "up")
        host.wait(A, healthy(A))
        assert host.allocate(A, f"{A}Mvp0").startswith("/dev/tap")
    line = host.log(rf"WARNING \[{A}\] \d+ log lines were dropped: the log was not read")
    dropped = int(line.split(f"[{A}] ")[1].split()[0])
    print(f"{refused} refused Allocates while supervisord was stopped: {dropped} lines dropped")
    assert 0 < dropped < refused
    host.log(rf"\[{A}\] lower link {A} is up: devices Healthy")
    assert host.kubelet.state(resource(B)).register_count == 1


def test_status_exits_4_in_bounded_time_when_supervisord_does_not_answer(host: Host) -> None:
    host.start()
    host.pids()
    with stopped(host.supervisord()):
        for options in ((), ("--alive",)):
            began = time.monotonic()
            done = host.node.status(*options)  # 30 s timeout: it used to hang for good
            took = time.monotonic() - began
            print(f"status {' '.join(options)} with supervisord stopped: {took:.2f}s")
            assert done.returncode == 4, done
            assert done.stdout == ""
            [line] = done.stderr.splitlines()
            assert line.startswith("macvtapdp: error: cannot reach supervisord at unix://"), line
    assert host.node.status().returncode == 0


# -- 7. nothing stays down -------------------------------------------------------------------


def test_a_watchdog_killed_during_its_backoff_still_brings_the_fatal_resource_back(
    host: Host,
) -> None:
    host.start()
    before = host.pids()
    first = host.kubelet.state(resource(B))
    loop = CrashLoop(host.node, f"resource-{B}")
    loop.start()
    loop.join(40)
    assert loop.error is None and loop.fatal_at is not None, (loop.error, loop.states)

    os.kill(before["watchdog"], signal.SIGKILL)  # its pending restart of resource-lkb dies too
    back = host.wait(B, lambda s: s.register_count > first.register_count and healthy(B)(s), 40)
    after = host.pids()
    print(f"FATAL, watchdog killed -> registered again: {time.monotonic() - loop.fatal_at:.1f}s")
    assert after["watchdog"] != before["watchdog"]
    assert after[f"resource-{B}"] not in loop.killed
    assert after[f"resource-{A}"] == before[f"resource-{A}"]
    assert back.endpoint != first.endpoint
    host.log(rf"\[watchdog\] resource-{B}:resource-{B} has been FATAL for \d+ s; starting it again")
    assert host.node.status().returncode == 0


# -- 8. a full run directory ------------------------------------------------------------------


def test_a_full_run_dir_takes_no_resource_down(host: Host) -> None:
    mount_tmpfs(host, host.node.run_dir, "1m")
    host.start()
    before = host.pids()
    first = host.kubelet.state(resource(A))
    fill(host.node.run_dir)
    since = host.mark()

    os.kill(before[f"resource-{A}"], signal.SIGKILL)  # it starts again on the full disk
    again = host.wait(A, lambda s: s.register_count > first.register_count and healthy(A)(s))
    assert host.allocate(A, f"{A}Mvp0").startswith("/dev/tap")
    host.ns.ip("link", "set", A, "down")
    host.wait(A, unhealthy(A))
    host.ns.ip("link", "set", A, "up")
    host.wait(A, healthy(A))
    assert host.allocate(A, f"{A}Mvp1").startswith("/dev/tap")
    host.log(rf"WARNING \[{A}\] cannot write .*/state/{A}\.json .*No space left on device", since)
    host.log(rf"WARNING \[{A}\] cannot write .*/taps/{A}\.json .*No space left on device", since)
    time.sleep(2.0)  # a process that died of it would have been restarted by now

    after = host.pids()
    assert after[f"resource-{A}"] != before[f"resource-{A}"]
    assert {n: p for n, p in after.items() if n != f"resource-{A}"} == {
        n: p for n, p in before.items() if n != f"resource-{A}"
    }
    assert host.kubelet.state(resource(A)).register_count == again.register_count
    # the other resources may find the disk full too (their sweep reports its state): count A's
    said = host.node.output.lines[since:]
    warnings = [line for line in said if "cannot write" in line and f"[{A}]" in line]
    assert len(warnings) == 2, warnings  # once per file, not once per write


@pytest.mark.parametrize("mode", ["env", "file"])
def test_run_on_a_full_disk_is_one_line(host: Host, mode: str) -> None:
    run_dir = os.path.join(short_tempdir(), "run")
    os.mkdir(run_dir, 0o700)
    host.cleanups.append(lambda: rmtree(os.path.dirname(run_dir)))
    mount_tmpfs(host, run_dir, "64k")
    fill(run_dir)
    options = [f"--plugin-dir={host.node.plugin_dir}", f"--run-dir={run_dir}"]
    env = dict(host.node.env)
    if mode == "file":
        host.volume.resources(res(A))
        options.append(f"--config-file={host.volume.path}")
        env.pop("DP_MACVTAP_CONF")

    done = host.run(*options, env=env)

    one_error(done, f"run directory {run_dir}: cannot write ", "No space left on device")
    assert not os.path.exists(os.path.join(run_dir, "supervisor.sock"))
    assert processes_mentioning(run_dir) == {}


# -- 9. a lower link enslaved to a bridge ------------------------------------------------------


def test_a_lower_link_enslaved_to_a_bridge_is_unhealthy_with_its_reason_until_released(
    host: Host,
) -> None:
    host.start()
    host.pids()
    host.ns.ip("link", "add", "br0", "type", "bridge")
    host.ns.ip("link", "set", "br0", "up")
    bridge = host.ns.link("br0")
    assert bridge is not None
    reason = f"a port of a bridge (index {bridge['ifindex']}): busy"
    since = host.mark()

    host.ns.ip("link", "set", A, "master", "br0")
    host.wait(A, unhealthy(A))
    host.log(rf"\[{A}\] lower link {A} is {re.escape(reason)}: devices Unhealthy", since)
    with pytest.raises(grpc.RpcError) as refused:
        host.kubelet.allocate(resource(A), [f"{A}Mvp0"], timeout=10)
    err = refused.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "a port of a bridge" in (err.details() or ""), err
    shown = host.node.status()
    rows = table(shown.stdout)
    assert rows[A]["LOWER LINK"] == reason and rows[A]["DEVICES"] == f"0/{CAP} healthy", shown
    assert rows[B]["LOWER LINK"] == "up" and rows[B]["DEVICES"] == f"{CAP}/{CAP} healthy"
    assert not host.ns.macvtaps()

    host.ns.ip("link", "set", A, "nomaster")
    host.wait(A, healthy(A))
    host.log(rf"\[{A}\] lower link {A} is up: devices Healthy", since)
    assert host.allocate(A, f"{A}Mvp0").startswith("/dev/tap")
    assert table(host.node.status().stdout)[A]["LOWER LINK"] == "up"
    assert host.kubelet.state(resource(A)).register_count == 1  # the same stream throughout


# -- 10. any run directory path works, or is refused up front -----------------------------------


@pytest.mark.parametrize("mode", ["env", "file", "discovery"])
def test_a_run_dir_with_a_space_is_refused_in_one_line_before_anything_is_made(
    host: Host, mode: str
) -> None:
    base = short_tempdir()
    host.cleanups.append(lambda: rmtree(base))
    run_dir = os.path.join(base, "my run")
    options = [f"--plugin-dir={host.node.plugin_dir}", f"--run-dir={run_dir}"]
    env = dict(host.node.env)
    if mode != "env":
        env.pop("DP_MACVTAP_CONF")
    if mode == "file":
        host.volume.resources(res(A))
        options.append(f"--config-file={host.volume.path}")
    elif mode == "discovery":
        options.append("--discover-kinds=veth")

    done = host.run(*options, env=env)

    one_error(done, f"run directory {run_dir}: contains whitespace")
    assert os.listdir(base) == []
    assert processes_mentioning(base) == {}


@pytest.mark.parametrize("name", ["glob[1]", "star*", "relative"])
def test_a_run_dir_of_any_other_name_starts_its_resources_and_only_those(
    host: Host, name: str
) -> None:
    """supervisord includes the program files by a glob, relative to its configuration."""
    base = short_tempdir()
    host.cleanups.append(lambda: rmtree(base))
    rmtree(host.node.run_dir)  # the node's own, replaced
    host.node.run_dir = os.path.join(base, "run" if name == "relative" else name)
    # a run directory the glob "star*" also matches, with a program file of its own
    other = os.path.join(base, "star-other", "programs.d")
    os.makedirs(other)
    with open(os.path.join(other, "resource-evil.conf"), "w") as fh:
        fh.write("[program:resource-evil]\ncommand=sleep 1000\n")
    host.start_with_file(res(A), res(B), cwd=base if name == "relative" else None)
    programs = set(host.node.running(STEP_TIMEOUT))
    assert programs == {f"resource-{A}", f"resource-{B}", "reconcile", "watchdog"}
    assert host.node.status().returncode == 0


# -- 11. no orphans, no second run ------------------------------------------------------------


def serve_processes(plugin_dir: str) -> dict[int, str]:
    return {
        pid: cmd
        for pid, cmd in processes_mentioning(plugin_dir).items()
        if "macvtapdp.plugin" in cmd
    }


def test_every_program_dies_with_a_killed_supervisord_and_a_new_run_takes_over(
    host: Host,
) -> None:
    host.start_with_file(res(A), res(B))
    programs = host.pids()
    assert set(programs) == {f"resource-{A}", f"resource-{B}", "reconcile", "watchdog"}
    supervisord = host.supervisord()
    first = {n: host.kubelet.state(resource(n)) for n in (A, B)}

    os.kill(supervisord, signal.SIGKILL)
    host.exit_code = -signal.SIGKILL
    assert host.node.proc is not None and host.node.proc.wait(10) == -signal.SIGKILL
    dirs = (host.node.plugin_dir, host.node.run_dir)
    assert until(lambda: not processes_mentioning(*dirs), 10), processes_mentioning(*dirs)
    for name in (A, B):  # each ended its stream and removed its socket on the way out
        host.wait(name, lambda s: not s.connected)
    assert os.listdir(host.node.plugin_dir) == ["kubelet.sock"]

    host.exit_code = 0
    host.start(f"--config-file={host.volume.path}")  # the pod's container restarted
    for name in (A, B):
        state = host.wait(name, healthy(name))
        assert state.register_count == first[name].register_count + 1
    assert len(serve_processes(host.node.plugin_dir)) == 2  # one per resource, no orphan
    host.pids()
    assert host.node.status().returncode == 0


def test_a_second_run_on_a_live_run_dir_refuses_and_touches_nothing(host: Host) -> None:
    # No sweep: its first round, at a random moment within 5 s, rewrites the state files.
    host.start("--sweep-grace=0")
    pids = host.pids()
    time.sleep(0.5)  # the state files settled
    before = tree(host.node.run_dir)
    registered = {n: host.kubelet.state(resource(n)).register_count for n in (A, B)}

    for env in (host.node.env, {"DP_MACVTAP_CONF": json.dumps([res(A, capacity=1)])}):
        done = host.run(
            f"--plugin-dir={host.node.plugin_dir}", f"--run-dir={host.node.run_dir}", env=env
        )
        one_error(done, f"run directory {host.node.run_dir}: another macvtapdp run is using it")

    assert tree(host.node.run_dir) == before
    assert host.pids() == pids
    assert len(serve_processes(host.node.plugin_dir)) == 2
    for name in (A, B):
        state = host.kubelet.state(resource(name))
        assert state.register_count == registered[name] and healthy(name)(state)


def test_sigterm_delivered_to_any_thread_of_the_reconciler_stops_it_at_once(host: Host) -> None:
    """As supervisord's stop (SIGTERM, SIGKILL 5 s later) would find it: the kernel may hand
    the signal to any thread, and the main one must not sleep on in its select (up to 60 s)."""
    host.start_with_file(res(A), res(B))
    pids = host.pids()
    host.log(r"\[reconcile\] following configuration file ")
    time.sleep(1.0)  # its first pass is done: the main thread waits in select
    since = host.mark()
    [*_, tid] = threads_taking(pids["reconcile"], signal.SIGTERM)
    sent = time.monotonic()
    tgkill(pids["reconcile"], tid, signal.SIGTERM)
    host.log(r"\[reconcile\] stopped$", since)
    took = time.monotonic() - sent
    print(f"SIGTERM to a thread of the reconciler: stopped in {took:.3f}s")
    assert took < 3.0
    assert until(lambda: host.node.pid("reconcile") not in (0, pids["reconcile"]), 10)
    after = host.pids()  # supervisord started it again
    assert {n: p for n, p in after.items() if n != "reconcile"} == {
        n: p for n, p in pids.items() if n != "reconcile"
    }


# -- 12. hostile configuration files -----------------------------------------------------------

NESTED = "[" * 50_000 + "]" * 50_000  # an environment string is at most 128 KiB
HUGE = json.dumps([res(A)]) + " " * (2 << 20)  # valid JSON, but 2 MiB


def plant(volume: ConfigMapVolume, kind: str) -> None:
    """Make the volume's file (through its ``..data`` swap) hostile: a FIFO, /dev/zero..."""
    if kind == "nested":
        volume.write(NESTED)
    elif kind == "huge":
        volume.write(HUGE)
    else:
        volume.write("[]")  # a fresh generation, whose file is then replaced
        data = os.path.join(volume.dir, os.readlink(os.path.join(volume.dir, "..data")))
        path = os.path.join(data, volume.KEY)
        os.unlink(path)
        if kind == "fifo":
            os.mkfifo(path)
        else:
            os.symlink("/dev/zero", path)


REFUSED = {
    "fifo": "cannot read configuration file: not a regular file (a FIFO)",
    "zero": "cannot read configuration file: not a regular file (a character device)",
    "nested": "invalid configuration: nested deeper than 16 levels",
    "huge": f"cannot read configuration file: larger than {1 << 20} bytes",
}


@pytest.mark.parametrize("kind", [*REFUSED, "nested-env"])
def test_run_refuses_a_hostile_configuration_in_one_line(host: Host, kind: str) -> None:
    env = dict(host.node.env)
    options = [f"--plugin-dir={host.node.plugin_dir}", f"--run-dir={host.node.run_dir}/r"]
    if kind == "nested-env":
        env["DP_MACVTAP_CONF"] = NESTED
        expected = "DP_MACVTAP_CONF: invalid configuration: nested deeper than 16 levels"
    else:
        env.pop("DP_MACVTAP_CONF")
        plant(host.volume, kind)
        options.append(f"--config-file={host.volume.path}")
        expected = f"{host.volume.path}: {REFUSED[kind]}"

    done = host.run(*options, env=env)  # a FIFO used to hang it for good

    assert one_error(done) == f"macvtapdp: error: {expected}"
    assert not os.path.exists(f"{host.node.run_dir}/r")


def test_the_reconciler_outlives_hostile_configuration_files_and_applies_a_good_one(
    host: Host,
) -> None:
    host.start_with_file(res(A), res(B))
    pids = host.pids()
    first = {n: host.kubelet.state(resource(n)) for n in (A, B)}
    path = re.escape(host.volume.path)

    for kind in REFUSED:
        since = host.mark()
        plant(host.volume, kind)
        host.log(
            rf"ERROR \[reconcile\] invalid configuration in {path}; keeping the current", since
        )
        host.log(rf"ERROR \[reconcile\]   {path}: {re.escape(REFUSED[kind])}$", since)
        shown = host.node.status()
        assert shown.returncode == 0, shown  # every program still runs, the reconciler too
    assert host.pids() == pids
    for name in (A, B):
        state = host.kubelet.state(resource(name))
        assert state.register_count == first[name].register_count and healthy(name)(state)

    since = host.mark()
    host.volume.resources(res(A), res(B, capacity=2))
    host.wait(B, healthy(B, 2))
    host.log(rf"INFO \[reconcile\] configuration in {path} is valid again", since)
    host.log(rf"\[reconcile\] restarted resource {B}: capacity 4 -> 2$", since)
    after = host.pids()
    assert (
        after["reconcile"] == pids["reconcile"] and after[f"resource-{A}"] == pids[f"resource-{A}"]
    )


# -- 14. smaller ones ---------------------------------------------------------------------------


def long_plugin_dir(host: Host) -> str:
    """A plugin directory so long that only resource names of up to 4 characters fit."""
    base = short_tempdir()
    host.cleanups.append(lambda: rmtree(base))
    plugin_dir = os.path.join(base, "p" * (107 - 40 - 4 - len(base) - 2))
    os.mkdir(plugin_dir)
    rmtree(host.node.plugin_dir)  # the node's own, replaced
    host.node.plugin_dir = plugin_dir
    host.node.kubelet = FakeKubelet(plugin_dir)
    return plugin_dir


def test_run_refuses_a_name_too_long_for_the_actual_plugin_dir(host: Host) -> None:
    plugin_dir = long_plugin_dir(host)
    env = {"DP_MACVTAP_CONF": json.dumps([res(A), res("longer", A)])}

    done = host.run(f"--plugin-dir={plugin_dir}", f"--run-dir={host.node.run_dir}/r", env=env)

    one_error(
        done,
        f"resource 'longer': the name is too long for plugin directory {plugin_dir} "
        "(6 characters, at most 4: its socket path would exceed 107 bytes)",
    )
    assert not os.path.exists(f"{host.node.run_dir}/r")


def test_a_live_edit_with_a_name_too_long_for_the_plugin_dir_changes_nothing(host: Host) -> None:
    long_plugin_dir(host)
    host.start_with_file(res(A), res(B))
    pids = host.pids()
    path = re.escape(host.volume.path)
    since = host.mark()

    host.volume.resources(res(A), res(B), res("longer", A))
    host.log(rf"ERROR \[reconcile\] invalid configuration in {path}; keeping the current", since)
    host.log(r"ERROR \[reconcile\]   resource 'longer': the name is too long for plugin", since)
    time.sleep(1.0)  # a program added by mistake would be crash-looping by now
    assert host.pids() == pids
    assert host.node.status().returncode == 0


def test_run_refuses_more_than_64_resources(host: Host) -> None:
    many = [res(f"r{i}", A) for i in range(65)]
    env = {"DP_MACVTAP_CONF": json.dumps(many)}

    done = host.run(
        f"--plugin-dir={host.node.plugin_dir}", f"--run-dir={host.node.run_dir}/r", env=env
    )

    one_error(done, "DP_MACVTAP_CONF: 65 resources; at most 64 (one process each)")
    assert not os.path.exists(f"{host.node.run_dir}/r")


@pytest.mark.parametrize("program", ["reconcile", "watchdog"])
def test_a_stopped_helper_program_makes_status_exit_3(host: Host, program: str) -> None:
    host.start_with_file(res(A), res(B))
    host.pids()
    assert host.node.status().returncode == 0

    assert host.node.supervisorctl("stop", program).returncode == 0
    down = host.node.status()
    assert down.returncode == 3, down
    rows = table(down.stdout)
    assert rows[f"({program})"]["PROCESS"] == "STOPPED", down.stdout
    assert rows[A]["SERVING"] == rows[B]["SERVING"] == "yes", down.stdout
    assert host.node.status("--alive").returncode == 0  # supervisord itself answers

    assert host.node.supervisorctl("start", program).returncode == 0
    assert host.node.status().returncode == 0


def test_streams_held_by_another_client_do_not_make_status_say_serving_no(host: Host) -> None:
    host.start()
    host.pids()
    with grpc.insecure_channel(f"unix:{host.socket(A)}") as channel:
        stub = api_pb2_grpc.DevicePluginStub(channel)
        streams = [stub.ListAndWatch(api_pb2.Empty()) for _ in range(3)]  # with the kubelet's: 4
        try:
            for stream in streams:
                assert len(next(stream).devices) == CAP
            fifth = stub.ListAndWatch(api_pb2.Empty())
            with pytest.raises(grpc.RpcError) as refused:
                next(fifth)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
            shown = subprocess.run(
                [*macvtapdp(), "status", f"--run-dir={host.node.run_dir}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert shown.returncode == 0, shown
            assert shown.stderr == ""  # no gRPC log lines
            rows = table(shown.stdout)
            assert rows[A]["SERVING"] == "yes" and rows[A]["DEVICES"] == f"{CAP}/{CAP} healthy"
            assert host.allocate(A, f"{A}Mvp0").startswith("/dev/tap")
        finally:
            for stream in streams:
                stream.cancel()
    assert host.kubelet.state(resource(A)).register_count == 1
