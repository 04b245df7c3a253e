"""One error family for everything a user can fix.

A `ZooterError` is the user's to fix (a config key, an input line, a missing artifact, an unreachable store): the
CLI prints its message as one line and exits with its `exit_code`. Any other exception, a bare `ValueError` from
our own code included, is a bug: the CLI prints the traceback and exits 1.

Exit codes: 0 ok, 1 internal error, 2 bad input (config, data, artifacts), 3 store unavailable.
"""

from __future__ import annotations


class ZooterError(Exception):
    """A user-facing error; the message names the file:line, config key or object to fix."""

    exit_code = 2


class ConfigError(ZooterError):
    """A config or input problem, reported as one line that names the file and key."""


class InputError(ConfigError):
    """Bad input data; the message names the file and line."""


class ArtifactError(ZooterError):
    """An artifact is missing, unreadable or does not match its schema."""


class StoreRejected(ConfigError, OSError):
    """The OS refused a local store operation (permission, read-only filesystem, a file in the way, disk full).
    An OSError too, so code that tolerates a failing store call (lease heartbeats) still does."""


class StoreUnavailable(ZooterError, OSError):
    """The store's endpoint stayed unreachable for the whole retry budget."""

    exit_code = 3


class LeaseTimeout(ZooterError):
    """A run waited `store.lease_wait_s` on cells another live run holds, and none of them got finished."""
