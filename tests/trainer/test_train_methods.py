"""Each method learns: pretrain and SFT losses fall, DPO's reward accuracy rises; adapters get
gradients; chat rows keep attention within their examples.

Real: the preprocess stage building every dataset from Python's standard library text, the train
stage in this process (HF Trainer, TRL DPOTrainer, PEFT LoRA, bitsandbytes 4-bit on CPU), a tiny
Llama built from a config and pretrained here as the base. Emulated: nothing; the probe that reads
gradients is an ordinary TrainerCallback added to the real trainer.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

from kubetrain_trainer import data, train
from trainer_support import Assets, dpo_config, train_config, train_log


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> None:
    """Training runs in this process here: torch on one thread."""
    torch.set_num_threads(1)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def test_pretrain_loss_falls(assets: Assets) -> None:
    base = assets.base_model()  # 40 steps of pretraining by the train stage
    log = [e for e in train_log(assets.root / "base-work") if "loss" in e]
    assert [e["step"] for e in log] == list(range(1, 41))
    first, last = _mean([e["loss"] for e in log[:5]]), _mean([e["loss"] for e in log[-5:]])
    assert last < first - 0.5, (first, last)
    assert (base / "model.safetensors").exists() and (base / "tokenizer.json").exists()


def test_sft_on_chat_loss_falls(assets: Assets, tmp_path: Path) -> None:
    config = train_config(
        assets.chat(),
        tmp_path / "out",
        method="sft",
        model={"uri": str(assets.base_model())},
        training={"maxSteps": 20, "learningRate": 2e-3},
    )
    result = train.run(config, tmp_path / "work")
    losses = [e["loss"] for e in train_log(tmp_path / "work") if "loss" in e]
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.2, losses
    assert result["evalLoss"] is not None


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_dpo_reward_accuracy_rises(assets: Assets, tmp_path: Path, adapter: str) -> None:
    """Chosen answers are plain text, rejected ones the same text in capitals: learnable."""
    config = dpo_config(
        assets,
        tmp_path / "out",
        adapter,
        training={"maxSteps": 12, "learningRate": 1e-3 if adapter == "none" else 5e-3},
    )
    train.run(config, tmp_path / "work")
    log = [e for e in train_log(tmp_path / "work") if "loss" in e]
    accuracy = [e["rewardAccuracy"] for e in log]
    losses = [e["loss"] for e in log]
    assert accuracy[0] == 0.0  # step 1: the policy is the reference, no preference yet
    assert _mean(accuracy[-4:]) >= 0.8, accuracy
    assert _mean(losses[-4:]) < losses[0] - 0.1, losses


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, which trainable tensors hold a non-zero gradient."""

    def __init__(self) -> None:
        self.nonzero: list[dict[str, bool]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.nonzero.append(
            {
                name: p.grad is not None and bool(p.grad.abs().sum() > 0)
                for name, p in model.named_parameters()
                if p.requires_grad
            }
        )


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_weights_get_gradients(assets: Assets, tmp_path: Path, kind: str) -> None:
    config = train_config(
        assets.chat(),
        tmp_path / "out",
        method="sft",
        model={"uri": str(assets.base_model())},
        adapter={"type": kind, "r": 8, "alpha": 16, "dropout": 0.0},
        training={"maxSteps": 2, "learningRate": 1e-3},
    )
    session = train.prepare(config, tmp_path / "work")
    probe = GradientProbe()
    session.trainer.add_callback(probe)
    if kind == "qlora":
        assert any("Linear4bit" in type(m).__name__ for m in session.trainer.model.modules())
    session.train()
    step1, step2 = probe.nonzero
    assert step1 and all("lora_" in name for name in step1)  # only the adapter trains
    # LoRA starts with B = 0: step 1 moves every B, and from step 2 every A moves too.
    assert all(ok for name, ok in step1.items() if "lora_B" in name), step1
    assert all(step2.values()), step2


def test_chat_attention_stays_within_examples(assets: Assets) -> None:
    """A packed row's logits equal each example's logits computed alone."""
    dataset = data.open_dataset(assets.chat(), assets.root / "probe", _s3())
    split = dataset.split("train")
    assert split is not None
    row = next(split[i] for i in range(len(split)) if (split[i]["position_ids"] == 0).sum() >= 3)
    ids = torch.from_numpy(row["input_ids"])[None]
    positions = torch.from_numpy(row["position_ids"])[None]
    starts = [int(i) for i in (positions[0] == 0).nonzero()] + [ids.shape[1]]
    for implementation in ("sdpa", "eager"):
        model = LlamaForCausalLM.from_pretrained(
            str(assets.base_model()), attn_implementation=implementation
        ).eval()
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions).logits
            for start, end in itertools.pairwise(starts):
                alone = model(input_ids=ids[:, start:end]).logits
                assert torch.allclose(packed[:, start:end], alone, atol=1e-5), implementation
            # The control: the same row as one sequence mixes the examples.
            mixed = model(input_ids=ids).logits
            assert not torch.allclose(mixed[:, starts[1] :], packed[:, starts[1] :], atol=1e-3)


def _s3() -> Any:
    from kubetrain_trainer.config import AWS_S3

    return AWS_S3
