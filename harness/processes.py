"""Run the real programs for tests: a resource process and ``macvtapdp run``.

Processes run inside a test's network namespace (``ip netns exec``, which also
gives them that namespace's ``/sys``) and talk to the kubelet stand-in through
a short temporary plugin directory (unix socket paths are limited to 107
bytes). Their output is read from a pipe by a thread, line by line: supervisord
reopens ``/dev/stdout`` for every program, which a regular file would not
survive (platform-facts B4).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from harness.netns import NetNS

if TYPE_CHECKING:
    from harness.kubelet import ResourceState
    from macvtapdp.node.control import Supervisor

RESOURCE_DOMAIN = "macvtap.network.kubevirt.io"
# each test's node runs in a namespace of its own: a fixed port is free there
METRICS_ADDRESS = "127.0.0.1:9469"


def resource(name: str) -> str:
    """The extended resource of resource ``name``."""
    return f"{RESOURCE_DOMAIN}/{name}"


def all_healthy(capacity: int, registered_more_than: int = 0) -> Callable[[ResourceState], bool]:
    """A kubelet stand-in predicate: connected, registered more than the count given,
    every one of ``capacity`` devices Healthy."""
    return lambda s: (
        s.connected
        and s.register_count > registered_more_than
        and s.capacity == capacity
        and s.allocatable == capacity
    )


def all_unhealthy(capacity: int) -> Callable[[ResourceState], bool]:
    """Still connected (the stream must not break), every device Unhealthy."""
    return lambda s: s.connected and s.capacity == capacity and s.allocatable == 0


def macvtapdp() -> list[str]:
    """The installed console script (as in the image), else ``python -m macvtapdp``."""
    script = os.path.join(os.path.dirname(sys.executable), "macvtapdp")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "macvtapdp"]


def short_tempdir() -> str:
    return tempfile.mkdtemp(prefix="mdp", dir="/tmp")


def until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class Output:
    """Collects a process's output lines as they come."""

    def __init__(self, stream: Sequence[bytes] | None) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for raw in stream or ():  # type: ignore[attr-defined]
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str] | None:
        """The first line from index ``start`` matching ``pattern``, waiting for it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if found := regex.search(line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


class Proc:
    """A child process in a namespace, with its output collected."""

    def __init__(
        self,
        ns: NetNS,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            ns.argv(self.argv),
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.output = Output(self.popen.stdout)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the exit; the exit code, once all output is read."""
        self.popen.wait(timeout)
        self.output.join()
        if self.popen.stdout:
            self.popen.stdout.close()
        return self.popen.returncode

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL the whole session if it does not exit. The exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
        return self.wait()


def serve_argv(name: str, plugin_dir: str, *options: str) -> list[str]:
    """A resource process (``python -m macvtapdp.plugin``) as supervisord would start it;
    ``options`` override the defaults given here (a temporary run directory, no metrics)."""
    given = {o.split("=", 1)[0] for o in options}
    defaults = [f"--run-dir={plugin_dir}/run", "--metrics=false"]
    extra = [d for d in defaults if d.split("=", 1)[0] not in given]
    return [
        sys.executable, "-m", "macvtapdp.plugin", f"--name={name}",
        f"--plugin-dir={plugin_dir}", *extra, *options,
    ]  # fmt: skip


def processes_mentioning(*needles: str) -> dict[int, str]:
    """Processes (pid -> command line) whose command line or environment names a needle."""
    found: dict[int, str] = {}
    wanted = [n.encode() for n in needles]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:  # gone meanwhile
            continue
        if any(n in cmdline or n in environ for n in wanted):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def threads_taking(pid: int, sig: int) -> list[int]:
    """The threads of ``pid`` other than its main one that do not block ``sig``."""
    found = []
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{tid}/status") as fh:
            [blocked] = [int(line.split()[1], 16) for line in fh if line.startswith("SigBlk:")]
        if tid != pid and not blocked & (1 << (sig - 1)):
            found.append(tid)
    return found


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of ``pid`` (as the kernel may pick it for a process's signal)."""
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, sig) != 0:  # glibc >= 2.30
        raise OSError(ctypes.get_errno(), "tgkill")


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Node:
    """``macvtapdp run`` (supervisord and its programs) in a namespace, with a kubelet.

    ``env`` is the container's environment (``DP_MACVTAP_CONF`` and friends).
    """

    def __init__(self, ns: NetNS, env: Mapping[str, str] | None = None) -> None:
        from harness.kubelet import FakeKubelet

        self.ns = ns
        self.env = dict(env or {})
        self.plugin_dir = short_tempdir()
        self.run_dir = short_tempdir()
        self.kubelet = FakeKubelet(self.plugin_dir)
        self.proc: Proc | None = None

    def start(self, *options: str, cwd: str | None = None) -> Proc:
        """``macvtapdp run`` with the node's directories and any further ``options``.

        With ``cwd``, the run directory is given relative to it.
        """
        run_dir = os.path.relpath(self.run_dir, cwd) if cwd else self.run_dir
        argv = [*macvtapdp(), "run", f"--plugin-dir={self.plugin_dir}", f"--run-dir={run_dir}"]
        if not any(o.startswith("--metrics-address") for o in options):
            argv.append("--metrics-address=")
        self.proc = Proc(self.ns, [*argv, *options], env=self.env, cwd=cwd)
        return self.proc

    @property
    def output(self) -> Output:
        assert self.proc is not None
        return self.proc.output

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """supervisorctl with the rendered config, as ``kubectl exec`` would run it."""
        script = os.path.join(os.path.dirname(sys.executable), "supervisorctl")
        conf = os.path.join(self.run_dir, "supervisord.conf")
        return subprocess.run(
            [script, "-c", conf, *args], capture_output=True, text=True, timeout=30
        )

    def status(self, *options: str) -> subprocess.CompletedProcess[str]:
        """``macvtapdp status`` for this node, as a probe runs it."""
        argv = [*macvtapdp(), "status", f"--run-dir={self.run_dir}", *options]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def supervisor(self) -> Supervisor:
        """supervisord's XML-RPC client (a context manager; ``call(method, *args)``)."""
        from macvtapdp.node.control import Supervisor
        from macvtapdp.rundir import Layout

        return Supervisor(Layout(self.run_dir).server_url)

    def processes(self) -> dict[str, dict[str, Any]]:
        """supervisord's view: program name -> getProcessInfo dict."""
        with self.supervisor() as supervisor:
            return {str(p["name"]): p for p in supervisor.processes()}

    def running(self, timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        """Wait until supervisord has every program RUNNING; its view then."""
        seen: dict[str, dict[str, Any]] = {}

        def all_running() -> bool:
            nonlocal seen
            seen = self.processes()
            return all(info["statename"] == "RUNNING" for info in seen.values())

        assert until(all_running, timeout, 0.05), f"not all RUNNING: {seen}"
        return seen

    def pid(self, program: str) -> int:
        return int(str(self.processes()[program]["pid"]))

    def http_get(
        self, path: str, address: str = METRICS_ADDRESS, timeout: float = 10.0
    ) -> tuple[int, str]:
        """GET ``path`` from the node's metrics endpoint: (status, body); OSError if none."""
        import http.client

        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            with self.ns.entered():  # the socket is made, and stays, in the namespace
                conn.connect()
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def stop(self) -> int:
        """SIGTERM to supervisord (the pod's SIGTERM); its exit code."""
        code = self.proc.terminate() if self.proc else 0
        self.kubelet.stop()
        rmtree(self.plugin_dir)
        rmtree(self.run_dir)
        return code
