"""Two processes under torchrun: DeepSpeed ZeRO-2 and ZeRO-3 train exactly like plain DDP, with
the DeepSpeed config the operator generates; an S3 model is fetched once per node.

Real: `torchrun --standalone --nproc_per_node 2` (gloo on CPU) running the train stage — through
`python -m kubetrain_trainer train`, or through tests/support/zero_probe.py, which runs the same
`train.prepare` + `Session.train` and records what each rank holds of the parameters and the
optimizer state. DeepSpeed 0.19 with the config of the operator's `plan.deepspeed_config`; the
preprocess stage's dataset; a `moto_server` S3 endpoint holding the model. Emulated: GPUs — these
are CPU processes; NCCL and bf16 kernels are covered by test_train_gpu.py on a GPU machine.
DeepSpeed JIT-builds its shm_comm op once (~35 s) into .cache/torch_extensions, reused afterwards.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kubetrain_trainer import storage
from kubetrain_trainer.config import Distributed, S3Settings
from trainer_support import (
    PROBE,
    Assets,
    dpo_config,
    losses,
    operator_deepspeed,
    result,
    torchrun,
    train_config,
    write_config,
)


def parse_distributed(changes: dict[str, Any]) -> Distributed:
    """The planned `distributed` block with `changes` (wire names)."""
    return Distributed.model_validate(
        {"zeroStage": 0, "deepspeed": None, "worldSize": 1, **changes}, by_alias=True
    )


pytestmark = pytest.mark.slow

TRAINING = {
    "maxSteps": 10,
    "microBatchSize": 4,
    "learningRate": 3e-3,
    "lrScheduler": "cosine",
    "warmupRatio": 0.1,
    "precision": "fp32",
}


def test_zero2_and_zero3_match_ddp_on_two_processes(assets: Assets, tmp_path: Path) -> None:
    runs = {
        "ddp": {"zeroStage": 0, "worldSize": 2},
        "zero2": {"zeroStage": 2, "worldSize": 2, "deepspeed": operator_deepspeed(2)},
        "zero3": {"zeroStage": 3, "worldSize": 2, "deepspeed": operator_deepspeed(3)},
    }
    probes: dict[str, list[dict[str, Any]]] = {}
    for name, distributed in runs.items():
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
        work = tmp_path / f"{name}-work"
        done = torchrun(config, work, entry=PROBE)
        assert done.returncode == 0, done.stderr[-4000:]
        probes[name] = [json.loads((work / f"probe-rank-{r}.json").read_text()) for r in (0, 1)]
        assert [p["processGroupAfterStage"] for p in probes[name]] == [False, False], name

    ddp = losses(tmp_path / "ddp-work")
    assert sorted(ddp) == list(range(1, 11)) and ddp[10] < ddp[1]
    for name in ("zero2", "zero3"):
        got = losses(tmp_path / f"{name}-work")
        assert sorted(got) == list(range(1, 11))
        assert max(abs(ddp[s] - got[s]) for s in ddp) <= 1e-5, (name, ddp, got)

    # What each rank holds: [partition, full size, materialised] per parameter (zero_probe.py).
    # DDP: every parameter whole and all optimizer state, on both ranks.
    full = {name: numel for name, (_, numel, _) in probes["ddp"][0]["parameters"].items()}
    total = sum(full.values())
    whole = {name: [numel, numel, numel] for name, numel in full.items()}
    for rank in probes["ddp"]:
        assert rank["parameters"] == whole and rank["optimizerElements"] == total
    # ZeRO-2 and ZeRO-3: each rank steps only its partition of the fp32 master weights.
    for name in ("zero2", "zero3"):
        elements = [rank["optimizerElements"] for rank in probes[name]]
        assert all(e < total for e in elements) and sum(elements) >= total, (name, elements)
    # ZeRO-2 shards gradients and optimizer state, not parameters.
    assert all(rank["parameters"] == whole for rank in probes["zero2"])
    # ZeRO-3: every parameter is sharded — each rank holds only its part (the two parts cover
    # the tensor) and nothing stays materialised whole between steps.
    largest = max(full, key=full.__getitem__)
    assert full[largest] >= 64 * 1000  # the embedding: vocabulary × hidden size
    for name, numel in full.items():
        held = [rank["parameters"][name] for rank in probes["zero3"]]
        assert all(part < numel and size == numel and data == 0 for part, size, data in held), (
            name,
            held,
        )
        assert sum(part for part, _, _ in held) >= numel

    # The checkpoints hold one optimizer partition per rank, and the final weights are whole.
    for name in ("zero2", "zero3"):
        checkpoint = tmp_path / name / "checkpoints" / "step-00000010"
        shards = sorted(p.name for p in checkpoint.glob("global_step10/*optim_states.pt"))
        assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    final_ddp = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for name in ("zero2", "zero3"):
        final = load_file(tmp_path / name / "final" / "model.safetensors")
        assert final.keys() == final_ddp.keys()
        assert max(float((final_ddp[k] - final[k]).abs().max()) for k in final_ddp) <= 1e-4


def test_an_s3_model_is_fetched_once_per_node(
    assets: Assets, moto_endpoint: str, tmp_path: Path
) -> None:
    """LoRA SFT of a model (and its tokenizer) from S3 on two processes: one download."""
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    storage.client(s3).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/base"
    storage.upload_dir(assets.base_model(), uri, s3)
    config = write_config(
        tmp_path / "train.json",
        train_config(
            assets.chat(),
            tmp_path / "out",
            method="sft",
            model={"uri": uri},
            tokenizerUri=uri,
            adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            training={"maxSteps": 3, "microBatchSize": 2, "learningRate": 1e-2},
            checkpoints={"everySteps": 100, "keep": 1},
            distributed={"worldSize": 2},
            s3={"endpoint": moto_endpoint, "region": "us-east-1", "allowInsecureEndpoint": True},
        ),
    )
    work = tmp_path / "work"
    done = torchrun(config, work)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(losses(work)) == [1, 2, 3]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()
    assert result(work)["memoryPeakRssBytes"] > 0  # both ranks took the peak's all-reduce

    # storage.download_dir logs one line per call; model.uri and tokenizerUri share it.
    downloads = re.findall(rf"{re.escape(uri)}: \d+ files in (\S+)", done.stdout + done.stderr)
    assert len(downloads) == 1, done.stderr[-4000:]
    fetched = [p for p in (work / "models").iterdir()]
    assert [str(p) for p in fetched] == downloads
    assert not [p for p in fetched[0].rglob("*.part")]


def test_dpo_under_zero3_on_two_processes_matches_one_process(
    assets: Assets, tmp_path: Path
) -> None:
    """Full DPO with its frozen reference copy, which TRL prepares with DeepSpeed itself
    (`prepare_deepspeed`: ZeRO-3 inference, partitioned like the policy): two processes with
    half the micro-batch each train exactly like one process with the whole batch."""
    runs = {
        "one": ({"worldSize": 1}, 4, 1),
        "zero3": ({"zeroStage": 3, "worldSize": 2, "deepspeed": operator_deepspeed(3)}, 2, 2),
    }
    for name, (distributed, micro, nproc) in runs.items():
        config = write_config(
            tmp_path / f"{name}.json",
            dpo_config(
                assets,
                tmp_path / name,
                "none",
                training={
                    "maxSteps": 4,
                    "microBatchSize": micro,
                    "learningRate": 1e-3,
                    "lrScheduler": "constant",
                    "warmupRatio": 0.0,
                    "precision": "fp32",
                },
            ).model_copy(
                update={"distributed": parse_distributed(distributed)},
            ),
        )
        done = torchrun(config, tmp_path / f"{name}-work", nproc=nproc)
        assert done.returncode == 0, done.stderr[-4000:]
    one, zero3 = losses(tmp_path / "one-work"), losses(tmp_path / "zero3-work")
    assert sorted(one) == sorted(zero3) == [1, 2, 3, 4]
    assert abs(one[1] - math.log(2)) < 1e-4  # step 1: the policy is its reference
    assert max(abs(one[s] - zero3[s]) for s in one) <= 1e-5, (one, zero3)
    assert (tmp_path / "zero3" / "final" / "model.safetensors").exists()
