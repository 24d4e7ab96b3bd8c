"""The speed and memory switches of issue 17 are real: weightPrecision loads a full fine-tune (and
full DPO's reference copy) in bf16, attention reaches transformers, compile trains through
torch.compile, and precomputed DPO reference log-probabilities train without a reference model
— the same losses as with one — and survive a resume.

Real: the train stage in this process (HF Trainer, TRL 1.16 DPOTrainer, torch.compile with
inductor and the machine's gcc), the tiny base model and datasets the trainer tests share.
Emulated: nothing; the probe that looks at the trainer during training is a TrainerCallback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from kubetrain_trainer import train
from trainer_support import Assets, dpo_config, losses, train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> None:
    torch.set_num_threads(1)


def test_bf16_weights_for_the_policy_and_its_reference(assets: Assets, tmp_path: Path) -> None:
    config = dpo_config(
        assets,
        tmp_path / "out",
        "none",
        training={"maxSteps": 2, "weightPrecision": "bf16", "attention": "eager"},
    )
    session = train.prepare(config, tmp_path / "work")
    policy, reference = session.trainer.model, session.trainer.ref_model
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert policy.config._attn_implementation == "eager"
    assert reference.config._attn_implementation == "eager"
    assert session.memory_estimate is not None  # on CPU: estimated, not checked
    assert session.memory_estimate.setup.weight_precision == config.memory.setup["weight_precision"]
    result = session.train()
    assert result["step"] == 2 and math.isfinite(result["loss"])


def test_an_architecture_is_built_in_the_weight_precision(assets: Assets, tmp_path: Path) -> None:
    config = train_config(
        assets.text(), tmp_path / "out", training={"weightPrecision": "bf16", "attention": "eager"}
    )
    session = train.prepare(config, tmp_path / "work")
    assert {p.dtype for p in session.trainer.model.parameters()} == {torch.bfloat16}
    assert session.trainer.model.config._attn_implementation == "eager"
    assert session.memory_estimate is not None
    assert session.memory_estimate.total > 0


class CompiledGraphs(TrainerCallback):
    """Counts the graphs dynamo compiled by the end of each step."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from torch._dynamo.utils import counters

        self.graphs.append(int(counters["stats"]["unique_graphs"]))


def test_compile_trains(assets: Assets, tmp_path: Path) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    config = train_config(
        assets.text(), tmp_path / "out", training={"maxSteps": 3, "compile": True}
    )
    session = train.prepare(config, tmp_path / "work")
    assert session.trainer.args.torch_compile
    probe = CompiledGraphs()
    session.trainer.add_callback(probe)
    result = session.train()
    assert result["step"] == 3 and math.isfinite(result["loss"])
    assert probe.graphs and probe.graphs[0] > 0, probe.graphs  # inductor compiled the model
    torch._dynamo.reset()


class ReferenceProbe(TrainerCallback):
    """What the DPO trainer holds as its reference at every step."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.references: list[Any] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.references.append(self.trainer.ref_model)


TRAINING = {"learningRate": 1e-3, "lrScheduler": "constant", "warmupRatio": 0.0}


def _dpo(assets: Assets, out: Path, work: Path, steps: int, precompute: bool) -> Any:
    config = dpo_config(assets, out, "none", training={**TRAINING, "maxSteps": steps})
    config = config.model_copy(
        update={
            "dpo": config.dpo.model_copy(  # type: ignore[union-attr]
                update={"precompute_reference_log_probs": precompute}
            ),
            "checkpoints": config.checkpoints.model_copy(update={"every_steps": 3}),
        }
    )
    session = train.prepare(config, work)
    probe = ReferenceProbe(session.trainer)
    session.trainer.add_callback(probe)
    return session, probe


def test_precomputed_reference_log_probs(assets: Assets, tmp_path: Path) -> None:
    """The reference model never exists during training, and the losses are those of a run that
    keeps a reference copy (both references are the starting policy)."""
    kept, _ = _dpo(assets, tmp_path / "kept", tmp_path / "kept-work", 6, precompute=False)
    kept.train()
    session, probe = _dpo(assets, tmp_path / "pre", tmp_path / "pre-work", 6, precompute=True)
    columns = session.trainer.train_dataset.column_names
    assert {"ref_chosen_logps", "ref_rejected_logps", "row"} <= set(columns)
    assert session.trainer.ref_model is None and session.trainer._precompute_engine is None
    session.train()
    assert probe.references == [None] * 6
    with_copy, precomputed = losses(tmp_path / "kept-work"), losses(tmp_path / "pre-work")
    assert sorted(precomputed) == list(range(1, 7))
    assert abs(precomputed[1] - math.log(2)) < 1e-4  # step 1: the policy is its reference
    assert max(abs(with_copy[s] - precomputed[s]) for s in with_copy) < 1e-4, (
        with_copy,
        precomputed,
    )

    # Resumed at step 3 (a new process would do the same): the log-probs are computed again
    # from the starting weights, before the checkpoint's are loaded, and training goes on as
    # the uninterrupted run did.
    first, _ = _dpo(assets, tmp_path / "res", tmp_path / "res-work", 3, precompute=True)
    first.train()
    resumed, probe = _dpo(assets, tmp_path / "res", tmp_path / "res-work2", 6, precompute=True)
    assert resumed.resumed and resumed.position.start_step == 3
    resumed.train()
    assert probe.references == [None] * 3
    after = losses(tmp_path / "res-work2")
    assert sorted(after) == [4, 5, 6]
    assert max(abs(precomputed[s] - after[s]) for s in after) < 1e-4, (precomputed, after)
