"""The kubetrain Grafana dashboard as code (grafana-foundation-sdk, schemaVersion 41).

Series names are the contract of docs/metrics.md. `python observability/generate.py` writes the
JSON into the chart (charts/kubetrain/files/dashboard.json); tests/chart/test_dashboard.py fails
when the committed JSON is stale, and the same module runs every query below
against a real Prometheus that scraped a real `kubetrain run`.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import dashboard, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

UID = "kubetrain-runs"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Every trainer/preprocess query carries this selector: the run selector of the dashboard.
RUN = 'namespace=~"$namespace", run=~"$run"'
RATE = "$__rate_interval"


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return target.legend_format(legend) if legend else target


def series(
    title: str, unit: str, *targets: tuple[str, str], description: str = ""
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(8)
    panel = panel.description(description) if description else panel
    for index, (expr, legend) in enumerate(targets):
        panel = panel.with_target(query(expr, legend, chr(ord("A") + index)))
    return panel


def single(title: str, unit: str, expr: str, legend: str = "{{run}}") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(query(expr, legend))
    )


def variables() -> list[Any]:
    source = dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")

    def labels(name: str, label: str, selector: str) -> dashboard.QueryVariable:
        return (
            dashboard.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query({"query": f"label_values({selector}, {name})", "refId": "var"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
        )

    stages = '{__name__=~"kubetrain_train_step|kubetrain_preprocess_rows_total"'
    return [
        source,
        labels("namespace", "Namespace", stages + "}"),
        labels("run", "Run", stages + ', namespace=~"$namespace"}'),
    ]


def training_row() -> list[Any]:
    return [
        dashboard.Row("Training"),
        series(
            "Training and eval loss",
            "none",
            (f"kubetrain_train_loss{{{RUN}}}", "train {{run}}"),
            (f"kubetrain_eval_loss{{{RUN}}}", "eval {{run}}"),
        ),
        series("Learning rate", "none", (f"kubetrain_train_learning_rate{{{RUN}}}", "{{run}}")),
        series(
            "Gradient norm (before clipping)",
            "none",
            (f"kubetrain_train_grad_norm{{{RUN}}}", "{{run}}"),
        ),
        series(
            "Tokens per second",
            "short",
            (f"kubetrain_train_tokens_per_second{{{RUN}}}", "smoothed {{run}}"),
            (
                f"sum by (run) (rate(kubetrain_train_tokens_total{{{RUN}}}[{RATE}]))",
                "rate {{run}}",
            ),
        ),
        series(
            "Model FLOPs utilisation",
            "percentunit",
            (f"kubetrain_train_mfu_ratio{{{RUN}}}", "{{run}}"),
            description="Only on GPUs with a known 16-bit peak, in bf16/fp16.",
        ),
        series(
            "GPU memory (max over ranks)",
            "bytes",
            (f"max by (run) (kubetrain_gpu_memory_allocated_bytes{{{RUN}}})", "allocated {{run}}"),
            (f"max by (run) (kubetrain_gpu_memory_peak_bytes{{{RUN}}})", "peak {{run}}"),
        ),
        series(
            "GPU memory: peak vs estimate",
            "bytes",
            (
                f'max by (run) (kubetrain_train_memory_peak_bytes{{{RUN}, kind="allocated"}})',
                "peak allocated {{run}}",
            ),
            (
                f'max by (run) (kubetrain_train_memory_peak_bytes{{{RUN}, kind="reserved"}})',
                "peak reserved {{run}}",
            ),
            (
                f"max by (run) (kubetrain_train_memory_estimate_bytes{{{RUN}}})",
                "estimate {{run}}",
            ),
            (f"max by (run) (kubetrain_train_device_memory_bytes{{{RUN}}})", "GPU total {{run}}"),
            description="Rank 0's peaks so far against the memory model's estimate per process "
            "(docs/fit.md) and the GPU's total; a sanity rung past 95% of the GPU warns in "
            "its SanityPassed condition. CUDA runs only (CPU runs export their peak RSS, "
            'kind="rss").',
        ),
        heatmap.Panel()
        .title("Step time histogram")
        .datasource(DATASOURCE)
        .height(8)
        .span(8)
        .calculate(False)
        .with_target(
            query(
                "sum by (le) (increase("
                f"kubetrain_train_step_duration_seconds_bucket{{{RUN}}}[{RATE}]))",
                "{{le}}",
            ).format(PromQueryFormat.HEATMAP)
        ),
        series(
            "Step time p50 / p95",
            "s",
            (
                "histogram_quantile(0.5, sum by (le, run) (rate("
                f"kubetrain_train_step_duration_seconds_bucket{{{RUN}}}[{RATE}])))",
                "p50 {{run}}",
            ),
            (
                "histogram_quantile(0.95, sum by (le, run) (rate("
                f"kubetrain_train_step_duration_seconds_bucket{{{RUN}}}[{RATE}])))",
                "p95 {{run}}",
            ),
        ),
        series(
            "Dataloader wait (share of step time)",
            "percentunit",
            (
                "sum by (run) (rate("
                f"kubetrain_train_dataloader_wait_seconds_total{{{RUN}}}[{RATE}]))"
                " / sum by (run) (rate("
                f"kubetrain_train_step_duration_seconds_sum{{{RUN}}}[{RATE}]))",
                "{{run}}",
            ),
            description="Above 20% for 15 minutes fires TrainingInputBound.",
        ),
        single(
            "Progress",
            "percentunit",
            f"kubetrain_train_step{{{RUN}}} / kubetrain_train_total_steps{{{RUN}}}",
        ),
        single("ETA", "s", f"kubetrain_train_eta_seconds{{{RUN}}}"),
        single(
            "Checkpoint age",
            "s",
            f"time() - kubetrain_checkpoint_last_timestamp_seconds{{{RUN}}}",
        ),
        single("Last checkpoint step", "none", f"kubetrain_checkpoint_last_step{{{RUN}}}"),
        series(
            "Non-finite losses and failed checkpoint uploads",
            "short",
            (
                f"sum by (run) (increase(kubetrain_train_nonfinite_loss_total{{{RUN}}}[{RATE}]))",
                "NaN/Inf losses {{run}}",
            ),
            (
                "sum by (run) (increase("
                f"kubetrain_checkpoint_upload_failures_total{{{RUN}}}[{RATE}]))",
                "upload failures {{run}}",
            ),
        ),
        series(
            "DPO rewards",
            "none",
            (f"kubetrain_dpo_reward_margin{{{RUN}}}", "margin {{run}}"),
            (f"kubetrain_dpo_reward_accuracy_ratio{{{RUN}}}", "accuracy {{run}}"),
            description="DPO runs only.",
        ),
    ]


def preprocessing_row() -> list[Any]:
    return [
        dashboard.Row("Preprocessing"),
        series(
            "Rows by result and reason",
            "short",
            (
                f"sum by (run, result, reason) (kubetrain_preprocess_rows_total{{{RUN}}})",
                "{{run}} {{result}} {{reason}}",
            ),
        ),
        series(
            "Input read",
            "Bps",
            (
                f"sum by (run) (rate(kubetrain_preprocess_read_bytes_total{{{RUN}}}[{RATE}]))",
                "{{run}}",
            ),
        ),
        series(
            "Tokens and blocks produced",
            "short",
            (f"sum by (run) (kubetrain_preprocess_tokens_total{{{RUN}}})", "tokens {{run}}"),
            (f"sum by (run) (kubetrain_preprocess_blocks_total{{{RUN}}})", "blocks {{run}}"),
        ),
        series(
            "Rows by source and outcome",
            "short",
            (
                f"sum by (run, source, outcome) (kubetrain_preprocess_source_rows_total{{{RUN}}})",
                "{{run}} {{source}} {{outcome}}",
            ),
            description="Per data source: rows read, accepted, rejected and selected by the "
            "mixture (fraction, maxRows).",
        ),
        series(
            "Rejected rows by source and reason",
            "short",
            (
                "sum by (run, source, reason) "
                f"(kubetrain_preprocess_source_rejected_rows_total{{{RUN}}})",
                "{{run}} {{source}} {{reason}}",
            ),
            (
                f"sum by (run, source, state) (kubetrain_preprocess_source_files{{{RUN}}})",
                "{{run}} {{source}} files {{state}}",
            ),
            description="Per data source: rejected rows by reason, and its files (read, and "
            "excluded by its exclude globs).",
        ),
        series(
            "Tokens by source",
            "short",
            (
                f"sum by (run, source) (kubetrain_preprocess_source_tokens_total{{{RUN}}})",
                "{{run}} {{source}}",
            ),
            description="Tokens each source's selected rows contribute to the packed dataset.",
        ),
    ]


def operator_row() -> list[Any]:
    return [
        dashboard.Row("Operator"),
        series("Runs by phase", "short", ("sum by (phase) (kubetrain_operator_runs)", "{{phase}}")),
        series(
            "Training attempts by reason",
            "short",
            (
                f"sum by (reason) (increase(kubetrain_operator_run_attempts_total[{RATE}]))",
                "{{reason}}",
            ),
            (f"sum(increase(kubetrain_operator_stalls_total[{RATE}]))", "stalls"),
        ),
        series(
            "Reconcile errors",
            "short",
            (
                f"sum by (kind) (rate(kubetrain_operator_reconcile_errors_total[{RATE}]))",
                "{{kind}}",
            ),
        ),
    ]


def build() -> dict[str, Any]:
    """The dashboard as the plain JSON Grafana loads."""
    board = (
        dashboard.Dashboard("kubetrain: training runs")
        .uid(UID)
        .tags(["kubetrain", "training"])
        .description(
            "TrainingRuns: training, preprocessing and the operator (docs/observability.md)"
        )
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .editable()
    )
    for variable in variables():
        board = board.with_variable(variable)
    for item in [*training_row(), *preprocessing_row(), *operator_row()]:
        board = board.with_row(item) if isinstance(item, dashboard.Row) else board.with_panel(item)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    """Deterministic text of the committed JSON."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"
