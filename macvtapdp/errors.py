"""The errors macvtapdp raises, and what each means for the process.

    MacvtapdpError
    ├── PermanentError        retrying cannot help: report and exit non-zero
    │   ├── ConfigError       the configuration breaks a rule (one line per problem)
    │   └── RenderError       a value cannot be written safely into supervisord's config
    ├── TemporaryError        the world is not ready yet: retried in-process with backoff
    │   ├── RegistrationError the kubelet refused or did not answer Register
    │   └── LinkMissingError  the lower link does not exist (Allocate fails; health waits)
    └── AllocationError       the kernel refused a macvtap; Allocate fails, nothing is left

Library errors (``grpc.RpcError``, ``OSError`` from netlink) are chained as the
``__cause__`` so callers only ever catch ours.
"""

from __future__ import annotations

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


class AllocationError(MacvtapdpError):
    """Making a device's macvtap failed; the Allocate call fails and is rolled back."""
