"""The chart's alerts, checked and unit-tested by real promtool (Debian's prometheus package).

Real: Helm renders the PrometheusRule (chart_support); its spec is a Prometheus rule file, which
`promtool check rules` validates and `promtool test rules` runs against the synthetic series of
observability/alerts-test.yaml (a firing and a quiet case per alert). Nothing is emulated; the
series are synthetic by design (promtool's input_series). tests/chart/test_dashboard.py runs
the same expressions against a Prometheus that scraped a real run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import ROOT, prometheus_rules, stage_pod_templates

TEST_FILE = ROOT / "observability" / "alerts-test.yaml"
#: docs/metrics.md, "Alerts shipped with the chart".
ALERTS = {
    "TrainingStalled",
    "TrainingLossNotFinite",
    "TrainingLossNotDecreasing",
    "CheckpointTooOld",
    "CheckpointUploadFailing",
    "PreprocessRejectRateHigh",
    "TrainingInputBound",
    "TrainingRunFailed",
}
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: apt-get install --no-install-recommends prometheus")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_rules(directory: Path, spec: dict[str, Any]) -> None:
    (directory / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(TEST_FILE, directory / "alerts-test.yaml")


def alerts_of(spec: dict[str, Any]) -> set[str]:
    return {rule["alert"] for group in spec["groups"] for rule in group["rules"]}


def test_the_chart_ships_exactly_the_alerts_of_metrics_md() -> None:
    assert alerts_of(prometheus_rules()) == ALERTS


def test_promtool_check_rules(tmp_path: Path) -> None:
    write_rules(tmp_path, prometheus_rules())
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_test_rules(tmp_path: Path) -> None:
    write_rules(tmp_path, prometheus_rules())
    proc = promtool("test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, set[bool]] = {}
    for group in yaml.safe_load(TEST_FILE.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    assert cases == {alert: {True, False} for alert in ALERTS}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("stallTimeoutSeconds", 3600),
        ("checkpointMaxAgeSeconds", 14400),
        ("maxRejectedFraction", 0.05),
        ("maxDataloaderWaitFraction", 0.6),
    ],
)
def test_the_unit_tests_follow_the_thresholds_in_values(
    tmp_path: Path, setting: str, value: float
) -> None:
    """A raised threshold silences a firing case: the rules really read the chart's values."""
    write_rules(tmp_path, prometheus_rules(**{setting: value}))
    proc = promtool("test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr


def test_the_sanity_selector_matches_the_rungs_the_operator_renders(tmp_path: Path) -> None:
    """The PodMonitor copies kubetrain.dev/stage into `stage`; the alert must see every rung."""
    (rule,) = [
        r
        for g in prometheus_rules()["groups"]
        for r in g["rules"]
        if r["alert"] == "TrainingLossNotDecreasing"
    ]
    (pattern,) = set(re.findall(r'stage=~"([^"]+)"', rule["expr"]))
    exporting = [
        t["metadata"]["labels"]
        for t in stage_pod_templates("tulu-sft.yaml", tmp_path)
        if t["metadata"]["labels"].get("kubetrain.dev/metrics") == "true"
    ]
    stages = {x["kubetrain.dev/stage"] for x in exporting}
    assert {"preprocess", "train", "merge"} <= stages
    sanity = {s for s in stages if re.fullmatch(pattern, s)}
    assert sanity and all(s.startswith("sanity-") for s in sanity), stages
