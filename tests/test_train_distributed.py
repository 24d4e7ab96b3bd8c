"""Two processes under torchrun: DeepSpeed ZeRO-3 trains exactly like plain DDP.

Real: `torchrun --standalone --nproc_per_node 2 -m kubetrain_trainer train` (gloo on CPU),
DeepSpeed 0.19 ZeRO-3 with its parameters really sharded (each rank writes its own optimizer
partition), the preprocess stage's dataset. Emulated: GPUs — these are CPU processes; NCCL and bf16
kernels are covered by test_train_gpu.py on a GPU machine. DeepSpeed JIT-builds its shm_comm op
once (~35 s) into .cache/torch_extensions, reused afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainer_support import Assets, losses, torchrun, train_config, write_config

pytestmark = pytest.mark.slow

TRAINING = {"maxSteps": 10, "microBatchSize": 4, "lrScheduler": "cosine", "warmupRatio": 0.1}


def deepspeed_zero3(micro_batch: int, world: int) -> dict[str, object]:
    """The shape of config the operator's plan generates for zeroStage 3 (explicit batch sizes)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


def test_zero3_matches_ddp_on_two_processes(assets: Assets, tmp_path: Path) -> None:
    runs = {}
    for name, distributed in (
        ("ddp", {"zeroStage": 0, "worldSize": 2}),
        ("zero3", {"zeroStage": 3, "worldSize": 2, "deepspeed": deepspeed_zero3(4, 2)}),
    ):
        config = write_config(
            tmp_path / f"{name}.json",
            train_config(
                assets.text(),
                tmp_path / name,
                training=TRAINING,
                checkpoints={"everySteps": 10, "keep": 1},
                distributed=distributed,
            ),
        )
        done = torchrun(config, tmp_path / f"{name}-work")
        assert done.returncode == 0, done.stderr[-4000:]
        runs[name] = tmp_path / name

    ddp, zero3 = losses(tmp_path / "ddp-work"), losses(tmp_path / "zero3-work")
    assert sorted(ddp) == list(range(1, 11)) and sorted(zero3) == list(range(1, 11))
    assert max(abs(ddp[s] - zero3[s]) for s in ddp) <= 1e-5, (ddp, zero3)
    assert ddp[10] < ddp[1]

    # ZeRO-3 really sharded: one optimizer partition per rank, and the final weights gathered.
    checkpoint = runs["zero3"] / "checkpoints" / "step-00000010"
    shards = sorted(p.name for p in checkpoint.glob("global_step10/*optim_states.pt"))
    assert shards == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    final_ddp = load_file(runs["ddp"] / "final" / "model.safetensors")
    final_zero3 = load_file(runs["zero3"] / "final" / "model.safetensors")
    assert final_ddp.keys() == final_zero3.keys()
    assert max(float((final_ddp[k] - final_zero3[k]).abs().max()) for k in final_ddp) <= 1e-4
