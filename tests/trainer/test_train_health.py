"""Unhealthy training stops with exit 3 and says why; the sanity gate passes or fails with numbers.

Real: the preprocess stage, `python -m kubetrain_trainer train` in its own process (forked from a
warm interpreter, tests/support/trainer_support.py) with its real exit code and result JSON. The NaN
is injected through the optimizer — plain SGD with a learning rate of 1e38 overflows the weights in
one step, so the second loss is inf − inf — not through a patched function.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trainer_support import (
    Assets,
    Launcher,
    ledger,
    result,
    train_config,
    write_config,
)

pytestmark = pytest.mark.slow


def test_nonfinite_loss_stops_within_one_logging_interval(
    assets: Assets, launcher: Launcher, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "train.json",
        train_config(
            assets.text(),
            tmp_path / "out",
            training={
                "maxSteps": 50,
                "optimizer": "sgd",
                "learningRate": 1.0e38,
                "loggingSteps": 10,
                "maxGradNorm": 0.0,
                "maxGradNormAbort": 1.0e38,
            },
        ),
    )
    code, output = launcher.run("train", config, tmp_path / "work")
    assert code == 3, output[-3000:]
    failed = result(tmp_path / "work")
    assert failed["reason"] == "NonFiniteLoss" and failed["exitCode"] == 3
    stopped_at = failed["step"]
    assert stopped_at == 2  # step 1 is finite; the stop comes inside the first interval
    assert max(ledger(tmp_path / "work")) == stopped_at  # not one step more
    assert "lower training.learningRate" in failed["error"]


def test_exploding_gradient_norm_stops_the_run(
    assets: Assets, launcher: Launcher, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "train.json",
        train_config(assets.text(), tmp_path / "out", training={"maxGradNormAbort": 0.05}),
    )
    code, output = launcher.run("train", config, tmp_path / "work")
    assert code == 3, output[-3000:]
    failed = result(tmp_path / "work")
    assert failed["reason"] == "GradientExplosion" and failed["step"] == 1
    assert failed["gradNorm"] > 0.05


def _sanity(assets: Assets, root: Path, min_loss_drop: float, max_grad_norm: float) -> Path:
    config = train_config(
        assets.text(),
        root / "out" / "sanity",
        stage="sanity",
        sanity={"minLossDrop": min_loss_drop, "maxGradNorm": max_grad_norm},
        training={"maxSteps": 30, "loggingSteps": 3},
    )
    return write_config(root / "sanity.json", config)


def test_sanity_gate_passes_with_its_numbers(
    assets: Assets, launcher: Launcher, tmp_path: Path
) -> None:
    code, output = launcher.run("train", _sanity(assets, tmp_path, 0.05, 100.0), tmp_path / "work")
    assert code == 0, output[-3000:]
    done = result(tmp_path / "work", "sanity")
    assert done["memoryPeakRssBytes"] > 0 and done["deviceMemoryBytes"] is None
    gate = done["sanity"]
    assert gate["lossDrop"] >= 0.05 and gate["steps"] == 30
    assert gate["firstLoss"] > gate["lastLoss"] and math.isfinite(gate["maxGradNorm"])
    assert (tmp_path / "out" / "sanity" / "metrics.json").exists()
    assert not (tmp_path / "out" / "sanity" / "final").exists()


@pytest.mark.parametrize(
    ("min_loss_drop", "max_grad_norm", "reason"),
    [(0.9, 100.0, "SanityLossFlat"), (0.05, 0.2, "SanityGradNorm")],
)
def test_sanity_gate_fails_with_its_numbers(
    assets: Assets,
    launcher: Launcher,
    tmp_path: Path,
    min_loss_drop: float,
    max_grad_norm: float,
    reason: str,
) -> None:
    config = _sanity(assets, tmp_path, min_loss_drop, max_grad_norm)
    code, output = launcher.run("train", config, tmp_path / "work")
    assert code == 3, output[-3000:]
    failed = result(tmp_path / "work", "sanity")
    assert failed["reason"] == reason
    assert "sanity gate failed" in failed["error"]
    assert {"firstLoss", "lastLoss", "lossDrop", "maxGradNorm"} <= set(failed["sanity"])
    assert failed["memoryPeakRssBytes"] > 0 and "tokensPerSecond" in failed  # a failed rung too
