"""The run directory: what lives where, and the rules for trusting it.

One directory (a tmpfs or emptyDir in the pod) holds supervisord's config and
control socket, the program files of a dynamic configuration, the state files
resource processes write for ``status``, the metrics files, and ``node.json``
(the settings ``run`` resolved, so ``status`` needs nothing but the run dir).

Everything in it is run as root or read by root, so ``prepare`` (called by
``run`` only) makes it 0700 and refuses a directory that someone else owns or
that others can write, a symlink in its place, or one that a live ``run``
holds (``lock``). Subdirectories are made fresh: a planted ``state`` symlink or a
leftover ``programs.d/evil.conf`` cannot survive into a new run. Only ``taps``
(which device was given which /dev/tapN) is kept if it is a real directory of
ours: the pods holding those taps outlive a restart of the plugin.

Every program and ``status`` import this module for the layout, so it imports
only what naming paths needs; ``prepare``'s tools are imported when it runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from macvtapdp.errors import PermanentError

DEFAULT_RUN_DIR = "/run/macvtapdp"
RUN_DIR_FLAG = "--run-dir"
RUN_DIR_VAR = "MACVTAPDP_RUN_DIR"


class Layout:
    """Where the files of one run directory live (a value: equal if the directory is)."""

    __slots__ = ("run_dir",)

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.run_dir == self.run_dir

    def __hash__(self) -> int:
        return hash(self.run_dir)

    def __repr__(self) -> str:
        return f"Layout(run_dir={self.run_dir!r})"

    def _path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    @property
    def conf(self) -> str:
        return self._path("supervisord.conf")

    @property
    def socket(self) -> str:
        return self._path("supervisor.sock")

    @property
    def server_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> str:
        return self._path("supervisord.pid")

    @property
    def lock(self) -> str:
        return self._path("run.lock")

    @property
    def node_settings(self) -> str:
        return self._path("node.json")

    @property
    def programs_dir(self) -> str:
        """Program files ``reconcile`` adds and removes (discovery, config file)."""
        return self._path("programs.d")

    @property
    def state_dir(self) -> str:
        return self._path("state")

    def state_file(self, name: str) -> str:
        """Where resource ``name``'s process reports its registration for ``status``."""
        return self._path("state", f"{name}.json")

    @property
    def taps_dir(self) -> str:
        """Which /dev/tapN each device was given (kept across runs: the pods outlive us)."""
        return self._path("taps")

    def taps_file(self, name: str) -> str:
        return self._path("taps", f"{name}.json")

    @property
    def metrics_dir(self) -> str:
        """prometheus_client's multiprocess files (one set per process)."""
        return self._path("metrics")

    @property
    def restarts_file(self) -> str:
        """How often supervisord restarted each program (the watchdog counts)."""
        return self._path("metrics", "restarts.json")


def _refuse(path: str, why: str) -> PermanentError:
    return PermanentError(f"run directory {path}: {why}")


def check_owned(path: str, st: os.stat_result) -> None:
    """Refuse ``path`` unless it is a real directory of ours that others cannot write."""
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symlink; give the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise _refuse(path, f"can be written by others (mode {mode:04o}); chmod 0700 it")


def prepare(layout: Layout) -> int:
    """Create or check the run directory, lock it, and start its subdirectories afresh.

    Returns the descriptor holding the lock (inheritable, so the supervisord
    that ``run`` becomes keeps holding it). Raises PermanentError, before
    touching any file in it, if the directory cannot be trusted or another
    ``run`` holds it.
    """
    path = layout.run_dir
    if any(c.isspace() for c in path):
        # supervisord splits its [include] line on whitespace
        raise _refuse(path, "contains whitespace, which supervisord cannot include from")
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise _refuse(path, f"cannot create it: {err.strerror}") from err
    check_owned(path, os.lstat(path))
    fd = _lock(layout)
    sub = layout.taps_dir
    try:
        _kept_dir(path, sub)
        for sub in (layout.programs_dir, layout.state_dir, layout.metrics_dir):
            _fresh_dir(path, sub)
    except OSError as err:
        os.close(fd)
        raise _refuse(path, f"cannot prepare {sub}: {err.strerror}") from err
    return fd


def _lock(layout: Layout) -> int:
    import fcntl

    try:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise _refuse(layout.run_dir, f"cannot open {layout.lock}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _refuse(
                layout.run_dir,
                "another macvtapdp run is using it (stop that one, or give another --run-dir)",
            ) from err
        raise _refuse(layout.run_dir, f"cannot lock {layout.lock}: {err.strerror}") from err
    os.set_inheritable(fd, True)
    return fd


def _kept_dir(run_dir: str, path: str) -> None:
    """Keep ``path`` if it is a real directory of ours, else start it afresh."""
    try:
        check_owned(path, os.lstat(path))
    except FileNotFoundError:
        os.mkdir(path, 0o700)
    except PermanentError:
        _fresh_dir(run_dir, path)


def _fresh_dir(run_dir: str, path: str) -> None:
    """Replace ``path`` (whatever it is: a symlink, a file, a directory) by an empty 0700 dir."""
    import shutil

    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    os.mkdir(path, 0o700)
