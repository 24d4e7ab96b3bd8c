"""The operator's own settings, read once from the environment (table in docs/operator.md).

Timing and ports:
KUBETRAIN_RESYNC_SECONDS (30): the timer reconciles every run (and polls progress) this often.
KUBETRAIN_PROGRESS_SECONDS (30): at most one scrape per run this often, except on child events.
KUBETRAIN_BACKOFF_BASE_SECONDS (10) / _MAX_SECONDS (600): wait before a new attempt after a
failure, doubling per failure. KUBETRAIN_OPERATOR_METRICS_PORT (9401; 0: off): the operator's
/metrics. KUBETRAIN_WATCH_SERVER_TIMEOUT (300): seconds one watch request stays open.
Where metrics Services answer: KUBETRAIN_METRICS_URL, KUBETRAIN_METRICS_ENDPOINTS (progress.py).

The cluster's defaults for what a run's spec leaves unset (cluster_defaults.ClusterDefaults; the
spec's own value always wins): CLUSTER_ENV below. An empty variable is an unset one. A value that
does not validate stops the operator at start with the variable's name and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetrain_operator.cluster_defaults import NO_DEFAULTS, ClusterDefaults
from kubetrain_operator.progress import ENDPOINTS_ENV, URL_ENV
from kubetrain_operator.status import Timing

#: ClusterDefaults field → the environment variable it is read from (the chart sets each).
CLUSTER_ENV: dict[str, str] = {
    "trainer_image": "KUBETRAIN_TRAINER_IMAGE",
    "trainer_service_account": "KUBETRAIN_TRAINER_SERVICE_ACCOUNT",
    "image_pull_secrets": "KUBETRAIN_IMAGE_PULL_SECRETS",  # comma-separated names
    "metrics_port": "KUBETRAIN_TRAINER_METRICS_PORT",
    "cache_root": "KUBETRAIN_CACHE_ROOT",
    "s3_endpoint": "KUBETRAIN_S3_ENDPOINT",
    "s3_allow_insecure_endpoint": "KUBETRAIN_S3_ALLOW_INSECURE_ENDPOINT",  # true | false
    "s3_secret_name": "KUBETRAIN_S3_SECRET_NAME",
    "gpu_memory": "KUBETRAIN_GPU_MEMORY",
}
TIMING_ENV = (
    "KUBETRAIN_RESYNC_SECONDS",
    "KUBETRAIN_PROGRESS_SECONDS",
    "KUBETRAIN_BACKOFF_BASE_SECONDS",
    "KUBETRAIN_BACKOFF_MAX_SECONDS",
    "KUBETRAIN_OPERATOR_METRICS_PORT",
    "KUBETRAIN_WATCH_SERVER_TIMEOUT",
)
#: Every environment variable the operator reads (the chart test compares its Deployment's env).
ENVIRONMENT: frozenset[str] = frozenset(
    {*TIMING_ENV, *CLUSTER_ENV.values(), URL_ENV, ENDPOINTS_ENV}
)


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


_FLAGS = {"true": True, "false": False}


def cluster_defaults_from_env() -> ClusterDefaults:
    """The defaults the chart configured; unset or empty variables keep the built-in ones."""
    given: dict[str, Any] = {}
    for name, var in CLUSTER_ENV.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        if name == "image_pull_secrets":
            given[name] = tuple(part.strip() for part in raw.split(",") if part.strip())
        elif name == "s3_allow_insecure_endpoint":
            if raw.lower() not in _FLAGS:
                raise SystemExit(f"{var}={raw!r}: expected true or false")
            given[name] = _FLAGS[raw.lower()]
        else:
            given[name] = raw
    try:
        return ClusterDefaults(**given)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            var = CLUSTER_ENV.get(str(problem["loc"][0]), "?") if problem["loc"] else "?"
            raw = os.environ.get(var, "")
            lines.append(f"{var}={raw!r}: {problem['msg'].removeprefix('Value error, ')}")
        raise SystemExit("\n".join(lines)) from None


@dataclass(frozen=True)
class OperatorSettings:
    """Timing, ports and the cluster's defaults; tests shrink the timings to run lifecycles in
    seconds."""

    resync_seconds: float = 30.0
    progress_seconds: float = 30.0
    timing: Timing = field(default_factory=Timing)
    metrics_port: int = 9401
    watch_server_timeout: float = 300.0
    defaults: ClusterDefaults = NO_DEFAULTS

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
            defaults=cluster_defaults_from_env(),
        )
