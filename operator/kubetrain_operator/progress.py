"""Scrape a run's metrics Service into a `status.Progress` (the trainer's own series).

Where the Service answers is one setting: `KUBETRAIN_METRICS_URL`, a template with `{service}`,
`{namespace}` and `{port}` (default `http://{service}.{namespace}.svc:{port}/metrics`, the cluster
DNS name). Outside a cluster (tests, the stand-in, a laptop with port-forwards) the JSON file named
by `KUBETRAIN_METRICS_ENDPOINTS` maps `"namespace/service"` to a URL; it is read at every scrape,
so entries can be added while the operator runs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kubetrain_contract import metrics
from kubetrain_operator.status import Progress

DEFAULT_URL = "http://{service}.{namespace}.svc:{port}/metrics"
URL_ENV = "KUBETRAIN_METRICS_URL"
ENDPOINTS_ENV = "KUBETRAIN_METRICS_ENDPOINTS"
SCRAPE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Endpoints:
    """How a Service name becomes a URL (see the module docstring)."""

    template: str = DEFAULT_URL
    overrides: Path | None = None

    @classmethod
    def from_env(cls) -> Endpoints:
        file = os.environ.get(ENDPOINTS_ENV)
        return cls(
            template=os.environ.get(URL_ENV, DEFAULT_URL),
            overrides=Path(file) if file else None,
        )

    def url(self, namespace: str, service: str, port: int) -> str:
        if self.overrides is not None:
            try:
                mapping = json.loads(self.overrides.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                mapping = {}
            found = mapping.get(f"{namespace}/{service}")
            if found:
                return str(found)
        return self.template.format(service=service, namespace=namespace, port=port)


def parse_samples(text: str) -> dict[str, float]:
    """The progress series by name (first sample of each; every series carries `run`); the
    memory peak by `metrics.memory_peak_key(kind)`, one key per kind."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in metrics.PROGRESS:
                continue
            key = sample.name
            if key == metrics.TRAIN_MEMORY_PEAK:
                key = metrics.memory_peak_key(sample.labels.get("kind", ""))
            samples.setdefault(key, float(sample.value))
    return samples


async def scrape(session: aiohttp.ClientSession, url: str) -> Progress | None:
    """One scrape; None when the endpoint does not answer (pod starting, between stages)."""
    try:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with session.get(url, timeout=timeout) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    samples = parse_samples(text)
    return Progress(samples, time.time()) if samples else None
