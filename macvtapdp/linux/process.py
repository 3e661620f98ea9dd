"""Process-level safety nets: die with the parent, and enough file descriptors.

A supervised program that outlives its supervisord (killed, when it is not PID
1) keeps serving, and a new ``run`` would then start a second process per
resource: the kernel's PR_SET_PDEATHSIG sends us SIGTERM when supervisord goes.
A resource process may face many connections: the soft descriptor limit is
raised to the hard one (the standard library's ``resource``).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent exits; if it is gone already, get it now."""
    parent = os.getppid()
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)  # the parent died before the prctl took effect


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft
