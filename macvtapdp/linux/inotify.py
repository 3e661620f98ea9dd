"""Wait for changes in the device-plugin directory with inotify.

The kubelet signals a restart only through this directory: a new kubelet
deletes every plugin socket and then creates a fresh ``kubelet.sock``. Inotify
lets a resource react within milliseconds without polling; the standard library
has no binding, so this is the few lines of ctypes it takes. ``wait`` also
returns on ``wake()`` (signal handlers call it) and on its timeout, so callers
can re-check the directory as a safety net.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct

IN_CLOSE_WRITE = 0x8
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
# A file edited in place (or a ConfigMap volume's ``..data`` symlink swapped) is also a change
FILE_CHANGES = _MASK | IN_CLOSE_WRITE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class DirWatch:
    """Inotify on one directory; the directory may come and go.

    ``mask`` selects the events (default: entries created, deleted or moved);
    ``FILE_CHANGES`` adds files written and closed.
    """

    def __init__(self, path: str, mask: int = _MASK) -> None:
        self.path = path
        self._mask = mask
        self._fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wd: int | None = None
        self._arm()

    def _arm(self) -> None:
        """Watch the directory if it exists now (the kubelet creates it at start)."""
        if self._wd is not None:
            return
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(self.path), self._mask)
        if wd >= 0:
            self._wd = wd
        elif ctypes.get_errno() != errno.ENOENT:
            _check(wd, f"inotify_add_watch {self.path}")

    @property
    def wake_fd(self) -> int:
        """The write end of the wake pipe (non-blocking), e.g. for ``signal.set_wakeup_fd``."""
        return self._wake_w

    def wake(self) -> None:
        """Make a pending or the next ``wait`` return at once (async-signal safe)."""
        with contextlib.suppress(BlockingIOError):  # already woken
            os.write(self._wake_w, b"\0")

    def wait(self, timeout: float | None) -> list[tuple[int, str]]:
        """Block until something happens in the directory, a wake, or ``timeout``.

        Returns the (mask, file name) events read; an empty list means timeout,
        wake, or a directory that does not exist yet (then the wait is capped
        at 0.5 s so its creation is noticed).
        """
        if self._wd is None:
            self._arm()
            if self._wd is None:
                timeout = 0.5 if timeout is None else min(timeout, 0.5)
        ready, _, _ = select.select([self._fd, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            while True:
                try:
                    if not os.read(self._wake_r, 64):
                        break
                except BlockingIOError:
                    break
        return self._read() if self._fd in ready else []

    def fileno(self) -> int:
        """The inotify descriptor, for callers that select() on several sources."""
        return self._fd

    def read(self) -> list[tuple[int, str]]:
        """The queued events, without blocking; arms the watch if the directory is new."""
        self._arm()
        return self._read()

    def _read(self) -> list[tuple[int, str]]:
        events: list[tuple[int, str]] = []
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return events
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                self._forget()
            events.append((mask, os.fsdecode(raw.rstrip(b"\0"))))
        return events

    def _forget(self) -> None:
        if self._wd is not None:
            _libc.inotify_rm_watch(self._fd, self._wd)  # fails harmlessly once IGNORED
            self._wd = None

    def close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
