"""A stage's exit code: the only word a stage's container gets to say when the kubelet reaps it.

The trainer exits with these; the operator's lifecycle and `kubetrain run` read them to decide
whether to retry, so a code that meant one thing on one side and another on the other would retry
a broken run forever or give up on a transient one. Any other code is unexpected: retried.
"""

from typing import Final

EXIT_OK: Final = 0
EXIT_RETRY: Final = 1
"""Transient trouble (S3 throttling, a reset connection, a full disk): retried with backoff."""
EXIT_INVALID: Final = 2
"""Invalid config or input: retrying will not help."""
EXIT_UNHEALTHY: Final = 3
"""Unhealthy training (NaN/Inf loss, a failed sanity gate): retrying will not help."""
EXIT_TERMINATED: Final = 143
"""Terminated by SIGTERM after saving a checkpoint (128 + 15): the next attempt resumes."""

NON_RETRYABLE: Final = (EXIT_INVALID, EXIT_UNHEALTHY)
"""The codes after which the operator gives up instead of starting another attempt."""
