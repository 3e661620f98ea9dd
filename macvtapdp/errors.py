"""The errors macvtapdp raises, and what each means for the process.

    MacvtapdpError
    ├── PermanentError          retrying cannot help: report and exit non-zero
    │   ├── ConfigError         the configuration breaks a rule (one line per problem)
    │   └── RenderError         a value cannot be written safely into supervisord's config
    ├── TemporaryError          the world is not ready yet: retried in-process with backoff
    │   ├── RegistrationError   the kubelet refused or did not answer Register
    │   ├── LinkMissingError    the lower link does not exist (Allocate fails; health waits)
    │   ├── Unreachable         supervisord or the kubelet's PodResources API does not answer
    │   ├── Refused             supervisord answered a call with a fault (``code``)
    │   └── KernelError         the kernel refused a request (also an OSError, with its errno)
    │       └── EventsLost      the kernel dropped link events: re-read what you follow
    └── AllocationError         a device cannot be handed out; Allocate fails, nothing is left
        └── LowerLinkBusy       a passthru macvtap holds the lower link, or a bridge does

Library errors (``grpc.RpcError``, pyroute2's ``NetlinkError``, ``xmlrpc.client.Error``,
``OSError``) are caught where they happen and chained as the ``__cause__``, so callers
only ever catch these. This module imports nothing, so every layer may use it,
the kernel adapters in ``macvtapdp.linux`` included.
"""

from __future__ import annotations

import errno as errnos
import os
from collections.abc import Sequence


class MacvtapdpError(Exception):
    """Base of every error macvtapdp raises on purpose."""


class PermanentError(MacvtapdpError):
    """Retrying is useless: the CLI prints the message and exits with code 2."""


class ConfigError(PermanentError):
    """The configuration is invalid; ``problems`` holds one line per rule broken."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RenderError(PermanentError):
    """A value would change the meaning of the rendered supervisord config."""


class TemporaryError(MacvtapdpError):
    """The condition may clear by itself; the caller retries after a delay."""


class RegistrationError(TemporaryError):
    """The kubelet refused Register or did not answer it in time."""


class LinkMissingError(TemporaryError):
    """The resource's lower link does not exist in this network namespace."""


class Unreachable(TemporaryError):
    """A local service (supervisord, the kubelet's PodResources API) does not answer."""


class Refused(TemporaryError):
    """supervisord refused an XML-RPC call; ``code`` is its fault code."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class KernelError(TemporaryError, OSError):
    """The kernel refused a request; ``errno`` is the positive error number."""

    def __init__(self, code: int, operation: str, detail: str = "") -> None:
        self.operation = operation
        self.message = f"{operation}: {os.strerror(code)}" + (f" ({detail})" if detail else "")
        OSError.__init__(self, code, self.message)

    def __str__(self) -> str:
        return self.message


class EventsLost(KernelError):
    """The kernel dropped link events (ENOBUFS): re-read the state you follow."""

    def __init__(self) -> None:
        super().__init__(errnos.ENOBUFS, "read link events", "events were dropped: resync")


class AllocationError(MacvtapdpError):
    """Making a device's macvtap failed; the Allocate call fails and is rolled back."""


class LowerLinkBusy(AllocationError):
    """The lower link cannot take a macvtap: a passthru macvtap holds it (``holder``
    names that device, if known), or it is a port of a bridge, bond or team."""

    def __init__(self, message: str, holder: str | None = None, *, passthru: bool = False) -> None:
        self.holder = holder
        self.passthru = passthru
        super().__init__(message)
