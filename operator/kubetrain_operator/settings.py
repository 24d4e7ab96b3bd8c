"""The operator's own settings, read once from the environment (table in docs/operator.md).

KUBETRAIN_RESYNC_SECONDS (30): the timer reconciles every run (and polls progress) this often.
KUBETRAIN_PROGRESS_SECONDS (30): at most one scrape per run this often, except on child events.
KUBETRAIN_BACKOFF_BASE_SECONDS (10) / _MAX_SECONDS (600): wait before a new attempt after a
failure, doubling per failure. KUBETRAIN_OPERATOR_METRICS_PORT (9401; 0: off): the operator's
/metrics. KUBETRAIN_WATCH_SERVER_TIMEOUT (300): seconds one watch request stays open.
Where metrics Services answer: KUBETRAIN_METRICS_URL, KUBETRAIN_METRICS_ENDPOINTS (progress.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kubetrain_operator.status import Timing


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(
            f"{name}={raw!r}: expected a number of seconds, e.g. {default:g}"
        ) from None
    if value < 0:
        raise SystemExit(f"{name}={raw!r}: must not be negative")
    return value


@dataclass(frozen=True)
class OperatorSettings:
    """Timing and ports; tests shrink the timings to run lifecycles in seconds."""

    resync_seconds: float = 30.0
    progress_seconds: float = 30.0
    timing: Timing = field(default_factory=Timing)
    metrics_port: int = 9401
    watch_server_timeout: float = 300.0

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls(
            resync_seconds=max(_number("KUBETRAIN_RESYNC_SECONDS", 30.0), 0.1),
            progress_seconds=_number("KUBETRAIN_PROGRESS_SECONDS", 30.0),
            timing=Timing(
                backoff_base=_number("KUBETRAIN_BACKOFF_BASE_SECONDS", 10.0),
                backoff_max=_number("KUBETRAIN_BACKOFF_MAX_SECONDS", 600.0),
            ),
            metrics_port=int(_number("KUBETRAIN_OPERATOR_METRICS_PORT", 9401)),
            watch_server_timeout=_number("KUBETRAIN_WATCH_SERVER_TIMEOUT", 300.0),
        )
