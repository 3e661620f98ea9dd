"""prometheus_client's multiprocess files, made safe on a hostile node and kept bounded.

In multiprocess mode each process writes its values into mmap'ed files
``<kind>_<pid>.db`` in one directory (``Layout.metrics_dir``), and the endpoint
sums them when scraped. Three things are added here, on both sides.

Allocated up front (``claim``, by each writer before prometheus_client opens
its files). The library makes a file with ``truncate`` (sparse) and maps it; on
a full tmpfs the first store to a page with no memory behind it is SIGBUS,
which kills the process. A claimed file is made under a temporary name,
``posix_fallocate``'d to its whole size and only then linked in place, so a
full disk is an ordinary ENOSPC (the caller turns metrics off) and the library,
finding a file of that size, maps it without growing it.

Liveness by lock. Each writer holds an exclusive ``flock`` on its files for its
whole life; the kernel drops it when the process dies, however it dies. A file
whose lock can be taken belongs to a dead process: no pid lists, no pid reuse.

Bounded (``sweep``, by the endpoint at every scrape). A dead process's
gauges are deleted: nobody reports those devices any more. Its counters and
histograms are folded into one archive per kind, so a crash loop neither loses
counts nor piles up files. The fold is crash-safe: a dead writer's file is
first renamed ``<kind>_<pid>.<inode>.<g>.dead``, tagged with the archive generation
``g`` it is going into; the archive ``<kind>_archive.<g>.db`` is written whole
and renamed in place (the commit); only then are the folded files removed.
``counted`` takes the newest archive and only the ``.dead`` files tagged
after it, so at every instant each count is summed exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# prometheus_client names a process's files <prefix>_<pid>.db: one per kind of metric
WRITER_KINDS = ("counter", "histogram", "gauge_livesum")
FOLDED_KINDS = ("counter", "histogram")
# A resource process's keys take under 5 KiB even with the longest names (tests check)
FILE_SIZE = 1 << 14
LOCK_WAIT = 2.0  # a sweep holds a dead file's lock for one rename
STALE_NEW = 60.0  # a file in the making is this old only if its maker died

_WRITER = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_([0-9]+)\.db$")
_ARCHIVE = re.compile(r"^(counter|histogram)_archive\.([0-9]+)\.db$")
# <kind>_<pid>.<inode>.<tag>.dead
_RETIRED = re.compile(r"^(counter|histogram)_([0-9]+)\.([0-9]+)\.([0-9]+)\.dead$")
_NEW = ".new"  # files being made: never counted


# -- writers -------------------------------------------------------------------------------


def claim(directory: str, kinds: Sequence[str] = WRITER_KINDS, size: int = FILE_SIZE) -> list[int]:
    """Make (or take over) this process's files, fully allocated and locked.

    Returns their descriptors: keep them open, they hold the locks that say
    this process is alive. Raises OSError (ENOSPC on a full disk) having
    removed again the files it made.
    """
    pid = os.getpid()
    claimed: list[tuple[int, str | None]] = []  # (fd, path if made here)
    try:
        for kind in kinds:
            path = os.path.join(directory, f"{kind}_{pid}.db")
            fd, made = _claim(path, fresh=kind.startswith("gauge_"), size=size)
            claimed.append((fd, path if made else None))
    except BaseException:
        for fd, made_path in claimed:
            if made_path is not None:  # still locked by us: nobody else has it
                with contextlib.suppress(OSError):
                    os.unlink(made_path)
            os.close(fd)
        raise
    return [fd for fd, _ in claimed]


def _claim(path: str, *, fresh: bool, size: int) -> tuple[int, bool]:
    """The locked, allocated file at ``path``, and whether it was made here."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                return _create(path, size), True
            except FileExistsError:
                continue
        # left by a dead process that had our pid (a sweep may hold it for a moment)
        try:
            if not _lock(fd, LOCK_WAIT):
                raise OSError(errno.EBUSY, f"{path} is locked by another process")
            if not _same(fd, path):  # a sweep renamed it meanwhile
                os.close(fd)
                continue
            if fresh:  # its gauges describe that process, not us
                os.unlink(path)
                os.close(fd)
                continue
            os.posix_fallocate(fd, 0, max(size, os.fstat(fd).st_size))
            return fd, False
        except BaseException:
            os.close(fd)
            raise
    raise OSError(errno.EAGAIN, f"{path} keeps changing under us")


def _create(path: str, size: int) -> int:
    """A new file at ``path``, locked and allocated before anyone can see it there."""
    tmp = path + _NEW
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # our pid's: a dead process's leftover
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.posix_fallocate(fd, 0, size)
        os.link(tmp, path)
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return fd


def _lock(fd: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _same(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# -- the endpoint: what to count ---------------------------------------------------------


def _generations(names: Iterable[str]) -> dict[str, int]:
    """The newest archive generation of each folded kind (0: none yet)."""
    newest = dict.fromkeys(FOLDED_KINDS, 0)
    for name in names:
        if m := _ARCHIVE.match(name):
            newest[m[1]] = max(newest[m[1]], int(m[2]))
    return newest


def counted(directory: str) -> list[str]:
    """The files whose values make up the totals now (see the module's docstring)."""
    names = sorted(os.listdir(directory))
    newest = _generations(names)
    chosen = []
    for name in names:
        if _WRITER.match(name):
            chosen.append(name)
        elif m := _ARCHIVE.match(name):
            if int(m[2]) == newest[m[1]]:
                chosen.append(name)
        elif (m := _RETIRED.match(name)) and int(m[4]) > newest[m[1]]:
            chosen.append(name)
    return [os.path.join(directory, name) for name in chosen]


def readable(path: str) -> bool:
    """Whether prometheus_client can read ``path`` (a torn or foreign file cannot be summed)."""
    from prometheus_client.mmap_dict import MmapedDict

    try:
        for key, _value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
            _metric, name, labels, _help = json.loads(key)
            if not (isinstance(labels, dict) and isinstance(name, str)):
                return False
    except (OSError, ValueError, RuntimeError, struct.error, TypeError, AttributeError):
        return False
    return True


def collect(directory: str) -> list[Metric]:
    """Every series of every process, dead or alive, summed (histograms made cumulative)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    files = counted(directory)
    try:
        return list(MultiProcessCollector.merge(files, accumulate=True))
    except (ValueError, RuntimeError, struct.error, TypeError, KeyError, AttributeError):
        bad = [f for f in files if not readable(f)]
        log.warning("metrics files that cannot be read are left out: %s", ", ".join(bad))
        good = [f for f in files if f not in bad]
        return list(MultiProcessCollector.merge(good, accumulate=True))


# -- the endpoint: the sweep ------------------------------------------------------------------


@dataclass
class Swept:
    """What one sweep did."""

    gauges: int = 0  # dead processes' gauge files removed
    folded: int = 0  # dead processes' counter/histogram files folded into an archive


def sweep(directory: str) -> Swept:
    """Remove dead processes' gauges, fold their counters and histograms (OSError: try later).

    The caller serializes sweeps and ``collect``: one process (the endpoint) does both.
    """
    done = Swept()
    names = os.listdir(directory)
    newest = _generations(names)
    for name in names:
        path = os.path.join(directory, name)
        if m := _WRITER.match(name):
            kind, pid = m[1], m[2]
            if kind.startswith("gauge_live"):
                done.gauges += _retire(path, None)
            elif kind in FOLDED_KINDS:
                # the inode makes it unique: a pid can die twice before a fold
                retired = os.path.join(directory, f"{kind}_{pid}.{{}}.{newest[kind] + 1}.dead")
                _retire(path, retired.format)
        elif name.endswith(_NEW) and _age(path) > STALE_NEW:
            _retire(path, None)  # a writer's or a fold's leftover (a fresh one is in the making)
    for kind in FOLDED_KINDS:
        done.folded += _fold(directory, kind)
    return done


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0


def _retire(path: str, to: Callable[[int], str] | None) -> int:
    """If ``path``'s writer is dead, rename it to ``to(inode)`` (None: delete it); 1 if done."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # alive
        if not _same(fd, path):
            return 0
        if to is None:
            os.unlink(path)
        else:
            os.rename(path, to(os.fstat(fd).st_ino))
        return 1
    finally:
        os.close(fd)


def _fold(directory: str, kind: str) -> int:
    """Fold ``kind``'s retired files into a new archive generation; how many were folded."""
    names = os.listdir(directory)
    current = _generations(names)[kind]
    pending = sorted(
        os.path.join(directory, name)
        for name in names
        if (m := _RETIRED.match(name)) and m[1] == kind and int(m[4]) > current
    )
    for path in [p for p in pending if not readable(p)]:
        log.warning("metrics file %s cannot be read; its counts are lost", path)
        os.unlink(path)
        pending.remove(path)
    if pending:
        sources = pending[:]
        if current:
            sources.append(os.path.join(directory, f"{kind}_archive.{current}.db"))
        current += 1
        _write_archive(os.path.join(directory, f"{kind}_archive.{current}.db"), _merged(sources))
    _clean(directory, kind, current)
    return len(pending)


def _clean(directory: str, kind: str, current: int) -> None:
    """Remove what archive ``current`` holds or replaces: older archives, retired files."""
    newest = f"{kind}_archive.{current}.db"
    for name in os.listdir(directory):
        old = _ARCHIVE.match(name) or _RETIRED.match(name)
        if old and old[1] == kind and int(old.groups()[-1]) <= current and name != newest:
            os.unlink(os.path.join(directory, name))


def _merged(files: Sequence[str]) -> list[Metric]:
    from prometheus_client.multiprocess import MultiProcessCollector

    return list(MultiProcessCollector.merge(files, accumulate=False))


def _write_archive(path: str, metrics: Sequence[Metric]) -> None:
    """``metrics`` in the library's own file format, written whole, then renamed to ``path``.

    Built in a memfd (no disk: it may grow freely), copied with plain writes
    (a full disk is ENOSPC, not SIGBUS), renamed in place: the commit.
    """
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    memfd = os.memfd_create("macvtapdp-archive", os.MFD_CLOEXEC)
    try:
        values = MmapedDict(f"/proc/self/fd/{memfd}")
        try:
            for metric in metrics:
                for sample in metric.samples:
                    labels = sample.labels
                    key = mmap_key(
                        metric.name,
                        sample.name,
                        list(labels),
                        list(labels.values()),
                        metric.documentation,
                    )
                    values.write_value(key, sample.value, 0.0)
        finally:
            values.close()
        (used,) = struct.unpack("i", os.pread(memfd, 4, 0))
        data = os.pread(memfd, used, 0)
    finally:
        os.close(memfd)
    tmp = path + _NEW
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
