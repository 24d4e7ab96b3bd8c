"""The trainer's Prometheus endpoint serves every series of docs/metrics.md during a run.

Real: the train stage in its own process (forked from a warm interpreter,
tests/support/trainer_support.py) serving /metrics over HTTP on a free port, scraped with urllib
while it trains and parsed with prometheus_client's own parser; a DPO run in this process for the
DPO-only gauges.
Emulated: nothing. Not on CPU, by design: MFU (no known peak) and GPU memory — see
test_train_gpu.py.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetrain_trainer import train
from ports import free_port
from trainer_support import Assets, Launcher, dpo_config, losses, train_config, write_config

#: The trainer series of docs/metrics.md every CPU run must serve (sample names as exposed).
REQUIRED = {
    "kubetrain_train_step",
    "kubetrain_train_total_steps",
    "kubetrain_train_epoch",
    "kubetrain_train_loss",
    "kubetrain_eval_loss",
    "kubetrain_train_learning_rate",
    "kubetrain_train_grad_norm",
    "kubetrain_train_tokens_total",
    "kubetrain_train_samples_total",
    "kubetrain_train_step_duration_seconds_bucket",
    "kubetrain_train_step_duration_seconds_count",
    "kubetrain_train_tokens_per_second",
    "kubetrain_train_last_step_timestamp_seconds",
    "kubetrain_train_eta_seconds",
    "kubetrain_train_nonfinite_loss_total",
    "kubetrain_train_dataloader_wait_seconds_total",
    "kubetrain_checkpoint_saves_total",
    "kubetrain_checkpoint_last_step",
    "kubetrain_checkpoint_last_timestamp_seconds",
    "kubetrain_checkpoint_save_duration_seconds_bucket",
    "kubetrain_checkpoint_upload_failures_total",
}


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name → {labels: value} of every sample the endpoint serves."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.slow
def test_endpoint_serves_every_series_during_a_run(
    assets: Assets, launcher: Launcher, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "train.json",
        train_config(
            assets.text(),
            tmp_path / "out",
            training={"maxSteps": 150, "loggingSteps": 10, "evalSteps": 40},
            checkpoints={"everySteps": 40, "keep": 1},
            metricsPort=port,
        ),
    )
    child = launcher.start("train", config, tmp_path / "work")
    seen: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def served() -> bool:
        nonlocal seen
        try:
            seen = scrape(port)
        except OSError:
            return False
        step = seen.get("kubetrain_train_step", {}).get((("run", "t"),), 0)
        return step >= 90 and set(seen) >= REQUIRED

    child.wait_for(served, timeout=120, poll=0.05)
    assert child.wait() == 0, child.output()[-3000:]
    assert set(seen) >= REQUIRED, sorted(REQUIRED - set(seen))
    run = (("run", "t"),)
    assert all(run in seen[name] for name in REQUIRED if not name.endswith("_bucket"))
    step = seen["kubetrain_train_step"][run]
    assert seen["kubetrain_train_total_steps"][run] == 150
    # 4 samples of 64 tokens per step; the counters and the gauge are read a moment apart.
    assert abs(seen["kubetrain_train_samples_total"][run] - 4 * step) <= 8
    assert abs(seen["kubetrain_train_tokens_total"][run] - 256 * step) <= 512
    assert seen["kubetrain_checkpoint_last_step"][run] in (40, 80, 120)
    assert seen["kubetrain_checkpoint_saves_total"][run] >= 2
    assert seen["kubetrain_train_nonfinite_loss_total"][run] == 0
    assert 0 < seen["kubetrain_train_loss"][run] < 10 and seen["kubetrain_eval_loss"][run] > 0
    assert time.time() - seen["kubetrain_train_last_step_timestamp_seconds"][run] < 120
    assert "kubetrain_train_mfu_ratio" not in seen  # no known peak on a CPU

    # Trainer is told to log every step (for the health checks), but the history it saves in
    # every checkpoint keeps only the logging intervals, with the interval's mean loss.
    state = tmp_path / "out" / "checkpoints" / "step-00000150" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    interval_losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert sorted(interval_losses) == list(range(10, 151, 10))
    assert interval_losses == pytest.approx(losses(tmp_path / "work"))


def test_dpo_runs_export_reward_gauges(assets: Assets, tmp_path: Path) -> None:
    config = dpo_config(
        assets, tmp_path / "out", "lora", training={"maxSteps": 4, "learningRate": 5e-3}
    )
    session = train.prepare(config, tmp_path / "work")
    session.train()
    registry = session.metrics.registry
    accuracy = registry.get_sample_value("kubetrain_dpo_reward_accuracy_ratio", {"run": "t"})
    margin = registry.get_sample_value("kubetrain_dpo_reward_margin", {"run": "t"})
    assert accuracy is not None and 0 <= accuracy <= 1
    assert margin is not None
