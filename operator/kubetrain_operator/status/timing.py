"""Time as the API server writes it, and the restart backoff."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Operator-wide timing (settings, not spec): restart backoff."""

    backoff_base: float = 10.0
    backoff_max: float = 600.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before attempt n+1 after the n-th failed attempt."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(failures - 1, 0)))


#: The operator's default timing (settings.py overrides it from the environment).
DEFAULT_TIMING = Timing()


def parse_time(value: Any) -> float | None:
    """RFC 3339 (as the API server writes it) → unix seconds."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
