"""Exact resume with dropout: the random state is restored, not only the weights and the data.

Real: the train stage forked from the warm launcher, SIGTERM (checkpoint, exit 143) and a restart,
HF Trainer's per-rank RNG state in the checkpoint, PEFT LoRA with dropout 0.05, and a Llama whose
config has attention dropout 0.1 (the tiny base model of the trainer tests, its config edited).
Emulated: nothing.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from stage_base import train_block
from trainer_support import Assets, Launcher, losses, resumed_step, train_config, write_config

pytestmark = pytest.mark.slow

STEPS = 12


def _with_attention_dropout(assets: Assets, root: Path) -> Path:
    model = root / "dropout-model"
    shutil.copytree(assets.base_model(), model)
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (model / "config.json").write_text(json.dumps(config))
    return model


def _runs(assets: Assets, root: Path, adapter: dict[str, Any], model: Path) -> Path:
    return write_config(
        root / "train.json",
        train_config(
            assets.text(),
            root / "out",
            method="sft",
            model={"uri": str(model)},
            adapter=adapter,
            training={"maxSteps": STEPS, "microBatchSize": 4, "learningRate": 1e-3},
            checkpoints={"everySteps": 100, "keep": 2},
        ),
    )


@pytest.mark.parametrize("kind", ["lora-dropout", "attention-dropout"])
def test_resume_after_sigterm_is_exact_with_dropout(
    assets: Assets, launcher: Launcher, tmp_path: Path, kind: str
) -> None:
    if kind == "lora-dropout":
        model = assets.base_model()
        adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05}
    else:
        model = _with_attention_dropout(assets, tmp_path)
        adapter = {"type": "none"}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    code, output = launcher.run("train", _runs(assets, straight, adapter, model), straight / "work")
    assert code == 0, output[-3000:]

    config = _runs(assets, interrupted, adapter, model)
    child = launcher.start("train", config, interrupted / "work")
    child.wait_for(lambda: len(losses(interrupted / "work")) >= 4)
    child.signal(signal.SIGTERM)
    assert child.wait() == 143, child.output()[-3000:]
    child = launcher.start("train", config, interrupted / "work")
    assert child.wait() == 0, child.output()[-3000:]
    stopped_at = resumed_step(child.output())
    assert stopped_at is not None and 4 <= stopped_at < STEPS

    expected, got = losses(straight / "work"), losses(interrupted / "work")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-6
    # The control: this model really draws dropout masks in training mode (two forward passes of
    # one batch differ), so equal losses after the resume mean the RNG state was restored.
    assert _dropout_draws(model, adapter)


def _dropout_draws(model: Path, adapter: dict[str, Any]) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetrain_trainer.config import AdapterConfig
    from kubetrain_trainer.model import lora_config

    network = AutoModelForCausalLM.from_pretrained(str(model))
    if adapter["type"] == "lora":
        from peft import get_peft_model

        network = get_peft_model(
            network, lora_config(AdapterConfig.model_validate(train_block("adapter", adapter)))
        )
        for name, weight in network.named_parameters():  # B = 0 would hide the dropout
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.5)
    network.train()
    ids = torch.arange(5, 69)[None]
    first, second = (float(network(input_ids=ids, labels=ids).loss) for _ in range(2))
    return abs(first - second) > 1e-6
