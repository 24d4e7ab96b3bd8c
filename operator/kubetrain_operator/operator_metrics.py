"""The operator's own Prometheus series (metrics.md, "Operator"), served on their own port."""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


@dataclass
class OperatorMetrics:
    """One registry per operator (injected, so tests read it with get_sample_value)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.runs = Gauge(
            "kubetrain_operator_runs", "TrainingRuns by phase", ["phase"], registry=self.registry
        )
        self.attempts = Counter(
            "kubetrain_operator_run_attempts_total",
            "Training attempts started, by reason (initial, failure, stall)",
            ["reason"],
            registry=self.registry,
        )
        self.stalls = Counter(
            "kubetrain_operator_stalls_total", "Stalls detected", registry=self.registry
        )
        self.errors = Counter(
            "kubetrain_operator_reconcile_errors_total",
            "Reconcile errors by kind (temporary, permanent)",
            ["kind"],
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._seen: set[str] = set()

    def set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Record a run's phase (None: the run is gone) and refresh the gauge."""
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        counts = Tally(self._phases.values())
        self._seen |= set(counts)
        for phase_name in self._seen:  # a phase that emptied goes to 0 rather than away
            self.runs.labels(phase_name).set(counts.get(phase_name, 0))

    def serve(self, port: int, address: str = "0.0.0.0") -> None:  # noqa: S104 (a pod's port)
        start_http_server(port, addr=address, registry=self.registry)
