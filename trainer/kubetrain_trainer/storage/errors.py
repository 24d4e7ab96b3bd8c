"""Storage failures as stage failures, with the stage contract's exit codes.

A missing object, a refused URI or refused credentials exit 2 (retrying will not help);
everything else — throttling, 5xx answers, broken connections — exits 1 and is retried.
"""

from __future__ import annotations

from typing import Any

from kubetrain_contract.exit_codes import EXIT_INVALID, EXIT_RETRY
from kubetrain_trainer.stage import StageFailure


class StorageError(StageFailure):
    """A URI that cannot be read or written; the message names the URI and what to do.

    Retryable (exit 1) unless a subclass says otherwise: storage trouble is mostly transient.
    """

    code = EXIT_RETRY

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(self.code, message, details)


class NotFound(StorageError):
    """The object or file does not exist: the config names the wrong thing (exit 2)."""

    code = EXIT_INVALID


class Refused(StorageError):
    """A URI, key or endpoint that must not be used (credentials, a path escape): exit 2."""

    code = EXIT_INVALID


class AccessDenied(StorageError):
    """Missing or wrong credentials: retrying with the same Secret will not help (exit 2)."""

    code = EXIT_INVALID


def unreadable(uri: str) -> str:
    """The message for a local file the stage's non-root user may not read."""
    return (
        f"{uri}: permission denied — the stage runs as a non-root user: make the file readable "
        "by it (chmod a+r, or fsGroup on the volume)"
    )
