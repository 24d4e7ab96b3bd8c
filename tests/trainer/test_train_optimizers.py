"""The optimizer and quantization rules: what is refused, and what really trains.

Real: the trainer's start-up refusals (`train.refuse_broken_combinations`, exit 2) over
transformers' own table of bitsandbytes optimizers; the train stage with a paged 8-bit
bitsandbytes optimizer (in this process) and with ZeRO-2 optimizer offload to the CPU (DeepSpeed
under `torchrun`, the operator's DeepSpeed config, through tests/support/zero_probe.py, which
reports that DeepSpeed's ZeRO optimizer really offloaded; DeepSpeed JIT-builds its CPU Adam once, ~2
min, into .cache/torch_extensions). Emulated: the process count of the refusal
table (a `DistEnv` of 2 processes; nothing is launched for a refusal).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetrain_trainer import train
from kubetrain_trainer.distributed import DistEnv
from kubetrain_trainer.stage import InvalidInput
from trainer_support import (
    PROBE,
    Assets,
    losses,
    operator_deepspeed,
    torchrun,
    train_config,
    write_config,
)

TWO = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2, node=0)
ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node=0)


def _bitsandbytes_optimizers() -> list[str]:
    from transformers import trainer_optimizer

    return [o.value for o in trainer_optimizer._BITSANDBYTES_OPTIMIZERS]


@pytest.mark.parametrize("optimizer", _bitsandbytes_optimizers())
def test_every_bitsandbytes_optimizer_is_refused_under_zero_across_processes(
    assets: Assets, tmp_path: Path, optimizer: str
) -> None:
    zero2 = {"zeroStage": 2, "worldSize": 2, "deepspeed": operator_deepspeed(2)}
    config = train_config(
        assets.text(), tmp_path, training={"optimizer": optimizer}, distributed=zero2
    )
    with pytest.raises(InvalidInput, match=f"training.optimizer: {optimizer} with zeroStage 2"):
        train.refuse_broken_combinations(config, TWO, cuda=False)
    alone = train_config(assets.text(), tmp_path, training={"optimizer": optimizer})
    train.refuse_broken_combinations(alone, ONE, cuda=False)  # one process, no ZeRO: fine


def test_qlora_with_zero3_is_refused_with_the_way_out(assets: Assets, tmp_path: Path) -> None:
    zero3 = {"zeroStage": 3, "worldSize": 2, "deepspeed": operator_deepspeed(3)}
    config = train_config(
        assets.text(),
        tmp_path,
        method="sft",
        model={"uri": str(assets.base_model())},
        adapter={"type": "qlora"},
        distributed=zero3,
    )
    with pytest.raises(InvalidInput, match=r"qlora with ZeRO-3 is not supported.*zeroStage 2"):
        train.refuse_broken_combinations(config, TWO, cuda=False)


@pytest.mark.slow
def test_a_paged_8bit_optimizer_trains(assets: Assets, tmp_path: Path) -> None:
    import bitsandbytes

    torch.set_num_threads(1)
    config = train_config(
        assets.text(),
        tmp_path / "out",
        training={"maxSteps": 8, "optimizer": "paged_adamw_8bit", "learningRate": 3e-3},
    )
    session = train.prepare(config, tmp_path / "work")
    outcome = session.train()
    optimizer = session.trainer.optimizer.optimizer  # accelerate wraps it
    assert isinstance(optimizer, bitsandbytes.optim.optimizer.Optimizer8bit)
    assert optimizer.is_paged
    assert any(  # 8-bit state exists (bitsandbytes keeps small tensors in 32 bits)
        state.get("state1") is not None and state["state1"].dtype == torch.uint8
        for state in optimizer.state.values()
    )
    got = losses(tmp_path / "work")
    assert outcome["step"] == 8 and got[8] < got[1]


@pytest.mark.slow
def test_zero2_with_the_optimizer_offloaded_to_the_cpu_trains(
    assets: Assets, tmp_path: Path
) -> None:
    deepspeed = operator_deepspeed(2, offload="cpu")
    assert deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    config = write_config(
        tmp_path / "train.json",
        train_config(
            assets.text(),
            tmp_path / "out",
            training={"maxSteps": 8, "learningRate": 3e-3},
            distributed={"zeroStage": 2, "worldSize": 1, "deepspeed": deepspeed},
        ),
    )
    done = torchrun(config, tmp_path / "work", nproc=1, entry=PROBE)
    assert done.returncode == 0, done.stderr[-4000:]
    got = losses(tmp_path / "work")
    assert max(got) == 8 and got[8] < got[1]
    probe = json.loads((tmp_path / "work" / "probe-rank-0.json").read_text())
    assert probe["cpuOffload"] is True, probe["optimizer"]
