"""The Grafana dashboard and the alert expressions, against a real Prometheus and a real run.

Real: the dashboard built by grafana-foundation-sdk (observability/dashboard.py) and committed as
JSON; PromQL syntax checked by `promtool check rules`; Debian's Prometheus server on 127.0.0.1,
scraping a real `kubetrain run` of the tiny example (preprocess, sanity and train stages, each a
real process serving its real registry) and evaluating the chart's rendered alert rules.

Forced, because a healthy tiny CPU run never produces them (each with its real registry class,
served over HTTP to the same Prometheus):
- MFU, GPU memory (the allocator's peaks, the GPU's total and the estimate shown beside them)
  and the DPO rewards exist only on GPUs / in DPO runs: a TrainerMetrics registry
  (kubetrain_trainer.metrics) for run "tiny-gpu" sets them, labelled as the PodMonitor would.
- The operator series come from the operator, which `kubetrain run` does not start: an
  OperatorMetrics registry (kubetrain_operator.operator_metrics) records phases (one run Failed),
  an attempt, a stall and a reconcile error through its own methods.
- PreprocessRejectRateHigh: the corpus carries three empty rows, so the stage really rejects some
  (below the 1% that would fail it).
- Alerts whose condition is a fault (a stall, NaN losses, failed uploads, a flat sanity loss, an
  old checkpoint, input-bound steps): their inner series — the left side of the comparison — are
  evaluated and must return data; the comparison itself is promtool's business (test_alerts.py).
Not real: Grafana (no server installs here); its variables are substituted as Grafana would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dashboard
import pytest
import yaml

from chart_support import CHART, ROOT, prometheus_rules
from ports import free_port

COMMITTED = CHART / "files" / "dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
KUBETRAIN = [sys.executable, "-m", "kubetrain_operator.cli"]
RUN, FORCED_RUN, NAMESPACE = "tiny", "tiny-gpu", "default"
#: Panels the issue asks for, by title.
PANELS = {
    "Training and eval loss",
    "Learning rate",
    "Gradient norm (before clipping)",
    "Tokens per second",
    "Model FLOPs utilisation",
    "GPU memory (max over ranks)",
    "GPU memory: peak vs estimate",
    "Step time histogram",
    "Step time p50 / p95",
    "ETA",
    "Checkpoint age",
    "Dataloader wait (share of step time)",
    "Rows by result and reason",
    "Rows by source and outcome",
    "Tokens by source",
    "Runs by phase",
    "Training attempts by reason",
    "Reconcile errors",
}
#: Queries whose series only the forced exporters produce (see the module docstring).
GPU_OR_DPO = (
    "kubetrain_train_mfu_ratio",
    "kubetrain_gpu_memory_",
    'kind="allocated"',
    'kind="reserved"',
    "kubetrain_train_memory_estimate_bytes",
    "kubetrain_train_device_memory_bytes",
    "kubetrain_dpo_",
)
#: Each alert's inner expressions: what must return data from the real run (or the forced
#: exporters) even when the alert itself is quiet. Each must occur in the alert's expression.
ALERT_PROBES = {
    "TrainingStalled": [
        "time() - max by (namespace, run) (kubetrain_train_last_step_timestamp_seconds)"
    ],
    "TrainingLossNotFinite": ["increase(kubetrain_train_nonfinite_loss_total[10m])"],
    "TrainingLossNotDecreasing": [
        'deriv(kubetrain_train_loss{stage=~"sanity-[0-9]+"}[10m])',
        'delta(kubetrain_train_step{stage=~"sanity-[0-9]+"}[10m])',
    ],
    "CheckpointTooOld": [
        "time() - max by (namespace, run) (kubetrain_checkpoint_last_timestamp_seconds)"
    ],
    "CheckpointUploadFailing": ["increase(kubetrain_checkpoint_upload_failures_total[15m])"],
    "TrainingInputBound": [
        "sum by (namespace, run) (rate(kubetrain_train_dataloader_wait_seconds_total[10m]))\n"
        "/ sum by (namespace, run) (rate(kubetrain_train_step_duration_seconds_sum[10m]))"
    ],
    "PreprocessRejectRateHigh": [
        "sum by (namespace, run) (last_over_time("
        'kubetrain_preprocess_rows_total{result="rejected"}[10m]))\n'
        "/ sum by (namespace, run) (last_over_time(kubetrain_preprocess_rows_total[10m]))"
    ],
    # The forced operator registry holds a Failed run: the whole expression has data.
    "TrainingRunFailed": [
        'max by (namespace, phase) (kubetrain_operator_runs{phase="Failed"}) > 0'
    ],
}


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard.build()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target."""
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def variable_queries() -> dict[str, str]:
    return {
        v["name"]: v["query"]["query"]
        for v in dashboard.build()["templating"]["list"]
        if v["type"] == "query"
    }


def grafana(expr: str, run: str = RUN, rate: str = "2s") -> str:
    """The expression as Grafana sends it: variables substituted."""
    return (
        expr.replace("$namespace", NAMESPACE).replace("$run", run).replace("$__rate_interval", rate)
    )


# ------------------------------------------------------------------------------------ static


def test_committed_json_is_what_the_code_builds() -> None:
    assert COMMITTED.read_text() == dashboard.render(), (
        "charts/kubetrain/files/dashboard.json is stale: run `make chart` and commit"
    )


def test_dashboard_has_the_panels_and_the_run_selector() -> None:
    built = dashboard.build()
    assert built["schemaVersion"] == 41 and built["uid"] == dashboard.UID
    titles = {p["title"] for p in panels()}
    assert titles >= PANELS, PANELS - titles
    assert set(variable_queries()) == {"namespace", "run"}
    for title, expr in queries():
        if "kubetrain_operator_" in expr:
            continue  # the operator's series carry no run
        for selector in re.findall(r"kubetrain_\w+\{([^}]*)\}", expr):
            assert 'run=~"$run"' in selector, f"{title}: {expr}"


def test_every_series_name_is_in_the_metrics_contract() -> None:
    contract = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(kubetrain_\w+)`", contract))
    for title, expr in queries():
        for name in re.findall(
            r"\b(kubetrain_\w+?)(?:_bucket|_sum|_count)?\b(?=[{\[(\s)]|$)", expr
        ):
            assert name in documented, f"{title}: {name} is not in docs/metrics.md"
    renamed = {"kubetrain_preprocess_read_bytes_total", "kubetrain_dpo_reward_accuracy_ratio"}
    assert renamed <= {name for _, e in queries() for name in re.findall(r"kubetrain_\w+", e)}


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana's variables substituted)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana(expr)}
        for i, (_, expr) in enumerate(queries())
    ]
    (tmp_path / "queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    proc = subprocess.run(
        [PROMTOOL, "check", "rules", "queries.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_probes_are_part_of_their_alerts() -> None:
    exprs = {r["alert"]: r["expr"] for g in prometheus_rules()["groups"] for r in g["rules"]}
    assert set(ALERT_PROBES) == set(exprs)
    for alert, probes in ALERT_PROBES.items():
        for probe in probes:
            assert probe in exprs[alert], f"{alert}: {probe!r} is not in {exprs[alert]!r}"


# -------------------------------------------------------------------------------------- live


@dataclass
class Live:
    """A Prometheus that scraped a real run; query_range over the run's lifetime."""

    url: str
    start: float
    end: float

    def get(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def series(self, expr: str) -> list[dict[str, Any]]:
        data = self.get(
            "/api/v1/query_range", query=expr, start=self.start, end=self.end, step=0.25
        )
        return [s for s in data["result"] if s["values"]]


def tiny_run_spec(tmp_path: Path) -> Path:
    """The tiny example, shortened, on a JSON-lines copy of its corpus plus three empty rows."""
    text = (ROOT / "examples" / "data" / "tinystories-cpu.txt").read_text()
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    rows = [{"text": d} for d in docs * 2]  # twice: a longer-lived stage
    for at in (0, len(rows) // 2, len(rows)):  # early too: the first chunk's tally is scraped
        rows.insert(at, {"text": ""})
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = yaml.safe_load((ROOT / "examples" / "tinystories-cpu.yaml").read_text())
    doc["metadata"]["name"] = RUN
    doc["spec"]["data"]["train"] = [str(corpus)]
    doc["spec"]["training"].update({"maxSteps": 40, "loggingSteps": 1, "evalSteps": 5})
    doc["spec"]["checkpoints"] = {"everySteps": 5, "keep": 2}
    doc["spec"]["sanity"] = {"steps": 20, "gpus": 0, "minLossDrop": 0.02}
    doc["spec"]["output"] = {"uri": str(tmp_path / "output")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def prometheus_config(tmp_path: Path, targets: dict[str, tuple[int, dict[str, str]]]) -> Path:
    """One job per target, labelled as the chart's PodMonitor/ServiceMonitor would label it.

    250 ms scrapes: a tiny stage lives a second or two (a real one, hours)."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(prometheus_rules()))
    config = {
        "global": {
            "scrape_interval": "250ms",
            "scrape_timeout": "250ms",  # a loaded CI core may answer slowly
            "evaluation_interval": "1s",
        },
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": name,
                "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}],
            }
            for name, (port, labels) in targets.items()
        ],
    }
    path = tmp_path / "prometheus.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def forced_exporters(trainer_port: int, operator_port: int) -> list[Any]:
    """The series no healthy CPU run produces, from the real registry classes."""
    from prometheus_client import start_http_server

    from kubetrain_operator.operator_metrics import OperatorMetrics
    from kubetrain_trainer.metrics import TrainerMetrics

    gpu = TrainerMetrics(run=FORCED_RUN)
    gpu.mfu.labels(run=FORCED_RUN).set(0.41)
    gpu.gpu_memory_allocated.labels(run=FORCED_RUN, rank="0").set(52e9)
    gpu.gpu_memory_peak.labels(run=FORCED_RUN, rank="0").set(61e9)
    gpu.memory_peak.labels(run=FORCED_RUN, kind="allocated").set(61e9)
    gpu.memory_peak.labels(run=FORCED_RUN, kind="reserved").set(63e9)
    gpu.memory_estimate.labels(run=FORCED_RUN).set(58e9)
    gpu.device_memory.labels(run=FORCED_RUN).set(85e9)
    gpu.dpo_reward_margin.labels(run=FORCED_RUN).set(0.8)
    gpu.dpo_reward_accuracy.labels(run=FORCED_RUN).set(0.7)
    operator = OperatorMetrics()
    operator.set_phase((NAMESPACE, RUN), "Training")
    operator.set_phase((NAMESPACE, "broken"), "Failed")
    operator.attempts.labels("initial").inc()
    operator.stalls.inc()
    operator.errors.labels("temporary").inc()
    servers = [
        start_http_server(trainer_port, addr="127.0.0.1", registry=gpu.registry)[0],
        start_http_server(operator_port, addr="127.0.0.1", registry=operator.registry)[0],
    ]
    return servers


def wait_scraping(url: str, proc: subprocess.Popen[bytes], jobs: int, timeout: float = 60) -> None:
    """Until every job is an active target: Prometheus applies targets up to 5 s after start,
    and a tiny stage would be over by then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "prometheus exited"
        try:
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=1) as resp:
                active = json.load(resp)["data"]["activeTargets"]
            if len(active) == jobs:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("prometheus did not start scraping")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    for binary in (PROMETHEUS, PROMTOOL):
        if not Path(binary).exists():
            pytest.fail(f"{binary} is missing: apt-get install --no-install-recommends prometheus")
    tmp = tmp_path_factory.mktemp("live")
    spec = tiny_run_spec(tmp)
    stage_ports = {"preprocess": free_port(), "sanity-1": free_port(), "train": free_port()}
    forced, operator_port, web = free_port(), free_port(), free_port()
    pod = {"namespace": NAMESPACE}
    targets = {
        f"stage-{stage}": (port, {**pod, "pod": f"{RUN}-{stage}", "stage": stage})
        for stage, port in stage_ports.items()
    }
    targets["forced-gpu"] = (forced, {**pod, "pod": f"{FORCED_RUN}-train-1", "stage": "train"})
    targets["operator"] = (
        operator_port,
        {"namespace": "kubetrain-system", "pod": "kubetrain-operator-0"},
    )
    config = prometheus_config(tmp, targets)
    servers = forced_exporters(forced, operator_port)
    url = f"http://127.0.0.1:{web}"
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
    )
    try:
        wait_scraping(url, prometheus, len(targets))
        start = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for stage, port in stage_ports.items():
            proc = subprocess.run(
                [
                    *KUBETRAIN,
                    "run",
                    str(spec),
                    "--workdir",
                    str(tmp / "work"),
                    "--stage",
                    stage,
                    "--metrics-port",
                    str(port),
                ],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, f"{stage}: {proc.stdout}{proc.stderr}"
        time.sleep(1.0)  # the last scrapes and one rule evaluation after the run
        yield Live(url, start, time.time())
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        for server in servers:
            server.shutdown()


def runs_in(series: list[dict[str, Any]]) -> set[str]:
    return {s["metric"].get("run", "") for s in series}


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_the_run(live: Live) -> None:
    empty = []
    for title, expr in queries():
        # The real run's series, except where only the forced exporter has them.
        source = FORCED_RUN if any(name in expr for name in GPU_OR_DPO) else RUN
        query = grafana(expr, run=source)
        if not live.series(query):
            empty.append(f"{title}: {query}")
    assert empty == []


@pytest.mark.slow
def test_the_run_selector_lists_the_run(live: Live) -> None:
    for name, query in variable_queries().items():
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
        assert match, query
        selector, label = match.groups()
        found = live.get(
            "/api/v1/series",
            **{"match[]": grafana(selector, run=".*")},
            start=live.start,
            end=live.end,
        )
        values = {s.get(label) for s in found}
        assert {"namespace": NAMESPACE, "run": RUN}[name] in values, (name, values)


@pytest.mark.slow
@pytest.mark.parametrize("alert", sorted(ALERT_PROBES))
def test_every_alert_expression_returns_data(live: Live, alert: str) -> None:
    for probe in ALERT_PROBES[alert]:
        series = live.series(probe)
        assert series, f"{alert}: {probe} returned nothing"
        if "operator" not in probe:
            assert RUN in runs_in(series), f"{alert}: {probe} has no data from the real run"


@pytest.mark.slow
def test_prometheus_evaluates_every_rule_without_error(live: Live) -> None:
    groups = live.get("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} == set(ALERT_PROBES)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # The forced Failed run really fires (pending: `for` is 0, so firing at once).
    failed = next(r for r in rules if r["name"] == "TrainingRunFailed")
    assert failed["state"] == "firing"
