"""Files written whole and read safely, in directories others might tamper with.

- ``write_atomically``: readers see the old content or the new, never half. The
  temporary file is made by ``tempfile.mkstemp`` (O_EXCL, a random name, mode
  0600) in the target's directory, so a symlink planted at a predictable name
  cannot redirect the write; the rename never follows a symlink at the target.
- ``read_regular``: only a regular file, at most ``limit`` bytes. A FIFO would
  block the reader forever and ``/dev/zero`` would never end; both are refused
  after an ``open`` that cannot block (O_NONBLOCK) and an ``fstat``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile


class NotRegular(ValueError):
    """The path is not a regular file, or it is too large."""


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` through a fresh temporary file renamed over it."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_regular(path: str, limit: int) -> str:
    """The UTF-8 text of regular file ``path`` (symlinks followed); NotRegular otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"not a regular file ({_kind(st.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise NotRegular(f"larger than {limit} bytes")
    return data.decode("utf-8")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"
