"""supervisord 4.3, made prompt: what ``macvtapdp run`` execs as the container's PID 1.

Stock supervisord 4.3 works in one-second ticks, which a device plugin feels:

- its handlers only record a signal, and Python retries the interrupted
  ``poll``, so SIGCHLD (a resource died) and SIGTERM (the pod is stopping) wait
  for the poll's 1 s timeout; and ``runforever`` calls ``transition()`` before
  ``reap()``, so a dead program is restarted one more loop later (the README
  has what that cost a killed resource, and shutdown);
- it spawns nothing before its first 1 s poll has timed out (fixed upstream
  in 4.4.0.dev0).

So the poller also watches a ``signal.set_wakeup_fd`` pipe and does not wait
on its first poll, and the supervisor steps its programs right after reaping.
These are subclasses installed where supervisord looks its classes up; the
rest is stock ``supervisord.main()``. pyproject pins supervisor to 4.3.x, and
tests/unit/test_supervise.py checks the internals this relies on.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from typing import Any

from supervisor import poller, supervisord


class WakefulPoller(poller.PollPoller):  # type: ignore[misc]
    """A PollPoller whose poll ends as soon as a signal arrives."""

    def initialize(self) -> None:
        super().initialize()
        self._first = True
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._poller.register(self._wake_r, select.POLLIN)

    def _poll_fds(self, timeout: float) -> list[tuple[int, int]]:
        if self._first:  # spawn at once instead of after the first timeout
            self._first, timeout = False, 0
        fds: list[tuple[int, int]] = super()._poll_fds(timeout)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        return [(fd, mask) for fd, mask in fds if fd != self._wake_r]

    def close(self) -> None:
        """Called when supervisord reloads (SIGHUP) or exits."""
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        super().close()


class PromptSupervisor(supervisord.Supervisor):  # type: ignore[misc]
    """Restarts a program in the same loop that reaped it."""

    def reap(self, once: bool = False, recursionguard: int = 0) -> Any:
        result = super().reap(once, recursionguard)
        if recursionguard == 0:
            for group in sorted(self.process_groups.values()):
                group.transition()
        return result


def main() -> None:
    poller.Poller = WakefulPoller
    supervisord.Supervisor = PromptSupervisor
    supervisord.main()


if __name__ == "__main__":
    main()
