"""Refusals at start-up (exit 2) and the data reader's guarantees, without training.

Real: the stage-config model, the preprocess stage's dataset, the trainer's own check functions and
its sample stream, transformers models built from configs. Emulated: the process layout of a
multi-process job is a `DistEnv` value (no processes are started); the refusals run before any
process would talk to another.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from kubetrain_contract.exit_codes import EXIT_INVALID
from kubetrain_trainer import data, model, train
from kubetrain_trainer.__main__ import main
from kubetrain_trainer.config import AWS_S3, Architecture
from kubetrain_trainer.distributed import DistEnv
from kubetrain_trainer.stage import InvalidInput, StageFailure
from stage_base import train_block
from trainer_support import Assets, train_config, write_config


def _env(world: int) -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=world, local_world_size=world, node=0)


ZERO2 = {"zero_optimization": {"stage": 2}}
LORA = {"type": "lora", "r": 8, "alpha": 16}
FROM_URI = {"uri": "/models/base"}  # never opened: the refusals run before anything is loaded


# One case per combination api.md refuses (and a stage config can still carry): the config
# changes, the processes torchrun started, whether CUDA is there, the field the message must
# name, and words of the fix.
REFUSED = {
    "dpo on random weights": (
        {"method": "dpo", "dpo": {"beta": 0.1}},
        1,
        False,
        "model.architecture",
        "set model.uri",
    ),
    "adapter on an architecture": (
        {"method": "sft", "adapter": LORA},
        1,
        False,
        "method.adapter",
        "use adapter type none with model.architecture",
    ),
    "adapter on pretrain": (
        {"model": FROM_URI, "adapter": LORA},
        1,
        False,
        "method.adapter",
        "use adapter type none, or method sft",
    ),
    "qlora in fp32 on a GPU": (
        {"method": "sft", "model": FROM_URI, "adapter": {**LORA, "type": "qlora"}},
        1,
        True,
        "training.precision",
        "use bf16",
    ),
    "offload below ZeRO-2": (
        {
            "distributed": {
                "zeroStage": 1,
                "deepspeed": {
                    "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}
                },
            }
        },
        1,
        False,
        "distributed.deepspeed",
        "set distributed.zeroStage: 2 or 3",
    ),
    "deepspeed config at zeroStage 0": (
        {"distributed": {"zeroStage": 0, "deepspeed": ZERO2}},
        1,
        False,
        "distributed.deepspeed",
        "regenerate the stage config",
    ),
    "8-bit optimizer with ZeRO on two processes": (
        {
            "training": {"optimizer": "paged_adamw_8bit"},
            "distributed": {"zeroStage": 2, "deepspeed": ZERO2, "worldSize": 2},
        },
        2,
        True,
        "training.optimizer",
        "use adamw_torch, or zeroStage: 0",
    ),
    "world size differs from the launch": (
        {"distributed": {"worldSize": 4}},
        2,
        False,
        "distributed.worldSize",
        "the plan expects 4 processes",
    ),
    "deepspeed stage differs from zeroStage": (
        {"distributed": {"zeroStage": 3, "deepspeed": ZERO2, "worldSize": 1}},
        1,
        False,
        "distributed.deepspeed",
        "zero_optimization.stage is 2",
    ),
    "ZeRO-3 that would save no weights": (
        {"distributed": {"zeroStage": 3, "deepspeed": {"zero_optimization": {"stage": 3}}}},
        1,
        False,
        "distributed.deepspeed",
        "stage3_gather_16bit_weights_on_model_save",
    ),
    "fp16 on CPU": (
        {"training": {"precision": "fp16"}},
        1,
        False,
        "training.precision",
        "fp16 needs a GPU",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_broken_combinations_are_refused(tmp_path: Path, case: str) -> None:
    changes, world, cuda, field, fix = REFUSED[case]
    config = train_config("unused.json", tmp_path, **changes)
    with pytest.raises(InvalidInput, match=re.escape(fix)) as refused:
        train.refuse_broken_combinations(config, _env(world), cuda)
    assert refused.value.exit_code == EXIT_INVALID
    assert refused.value.message.startswith(f"{field}: "), refused.value.message


@pytest.mark.parametrize(
    ("changes", "world", "cuda"),
    [
        ({"training": {"optimizer": "adamw_8bit"}}, 1, True),  # 8-bit without sharding
        ({"method": "sft", "model": FROM_URI, "adapter": {**LORA, "type": "qlora"}}, 1, False),
        (
            {
                "distributed": {
                    "zeroStage": 2,
                    "deepspeed": {
                        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}
                    },
                }
            },
            1,
            False,
        ),
        ({"method": "dpo", "dpo": {"beta": 0.1}, "model": FROM_URI, "adapter": LORA}, 1, False),
    ],
    ids=["8-bit without sharding", "qlora fp32 on CPU", "offload at ZeRO-2", "dpo with LoRA"],
)
def test_allowed_combinations_pass(
    tmp_path: Path, changes: dict[str, object], world: int, cuda: bool
) -> None:
    config = train_config("unused.json", tmp_path, **changes)
    train.refuse_broken_combinations(config, _env(world), cuda)


@pytest.mark.slow  # starts a stage or operator process
def test_a_refusal_exits_2_before_anything_loads(tmp_path: Path) -> None:
    """Through the real entry point: exit 2, the message in result-train.json."""
    config = train_config("unused.json", tmp_path / "out", method="dpo", dpo={"beta": 0.1})
    path = write_config(tmp_path / "train.json", config)
    assert main(["train", "--config", str(path), "--workdir", str(tmp_path / "w")]) == EXIT_INVALID
    error = json.loads((tmp_path / "w" / "result-train.json").read_text())["error"]
    assert error.startswith("model.architecture: method dpo needs a trained policy")


def test_model_must_fit_tokenizer_and_blocks(assets: Assets) -> None:
    dataset = data.open_dataset(assets.text(), assets.root / "checks", AWS_S3)
    tokenizer = model.load_tokenizer(dataset.tokenizer_dir)
    small = Architecture.model_validate(
        train_block("model.architecture", {"vocabSize": len(tokenizer) - 1})
    )
    with pytest.raises(InvalidInput, match="smaller than the tokenizer"):
        model.build_llama(small, tokenizer)
    fits = model.build_llama(
        Architecture.model_validate(train_block("model.architecture")), tokenizer
    )
    assert fits.get_input_embeddings().num_embeddings == len(tokenizer)
    model.check_compatible(fits, tokenizer, dataset.manifest)
    short = model.build_llama(
        Architecture.model_validate(train_block("model.architecture", {"contextLength": 32})),
        tokenizer,
    )
    with pytest.raises(InvalidInput, match="blockSize: 64 exceeds the model's context of 32"):
        model.check_compatible(short, tokenizer, dataset.manifest)
    bigger = {**dataset.manifest, "tokenizer": {**dataset.manifest["tokenizer"], "vocabSize": 5000}}
    with pytest.raises(InvalidInput, match="5000 tokens but the model's embeddings have"):
        model.check_compatible(fits, tokenizer, bigger)


def test_method_must_match_the_data(assets: Assets, tmp_path: Path) -> None:
    config = train_config(
        assets.text(), tmp_path, method="dpo", dpo={"beta": 0.1}, model={"uri": "/not/fetched"}
    )
    with pytest.raises(InvalidInput, match="dpo trains on preference data, the dataset is text"):
        train.prepare(config, tmp_path / "work")


def test_dataset_without_success_marker_is_refused(assets: Assets, tmp_path: Path) -> None:
    import json
    import shutil

    uri = json.loads(Path(assets.text()).read_text())["uri"]
    copy = tmp_path / "dataset"
    shutil.copytree(uri, copy)
    (copy / "_SUCCESS").unlink()
    pointer = tmp_path / "dataset.json"
    pointer.write_text(json.dumps({"key": copy.name, "uri": str(copy)}))
    with pytest.raises(InvalidInput, match="_SUCCESS"):
        data.open_dataset(str(pointer), tmp_path / "work", AWS_S3)


def test_missing_model_files_say_which_file_and_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=r"^tokenizerUri: .* holds no tokenizer") as caught:
        model.load_tokenizer(empty)
    assert "tokenizer.json" in caught.value.message and "tokenizerUri at" in caught.value.message
    (empty / "config.json").write_text("{}")
    with pytest.raises(InvalidInput, match=r"^model.uri: .* is not a saved model") as caught:
        model.load_pretrained(empty, dtype=torch.float32)
    assert "no weights" in caught.value.message and "model.safetensors" in caught.value.message
    with pytest.raises(InvalidInput, match=r"^model.uri: .* does not exist — point model.uri at"):
        model.local_dir(str(tmp_path / "absent"), tmp_path, AWS_S3, "model.uri")


def _dataset_copy(pointer: str, root: Path, **manifest_changes: object) -> str:
    """A copy of a dataset whose manifest says something else; returns its pointer."""
    uri = json.loads(Path(pointer).read_text())["uri"]
    copy = root / "dataset"
    shutil.copytree(uri, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    (root / "dataset.json").write_text(json.dumps({"key": manifest["key"], "uri": str(copy)}))
    return str(root / "dataset.json")


def test_dataset_errors_say_what_to_do(assets: Assets, tmp_path: Path) -> None:
    unknown = _dataset_copy(assets.text(), tmp_path / "a", format="audio")
    with pytest.raises(InvalidInput, match=r"^datasetPointer: .* has format 'audio'") as caught:
        data.open_dataset(unknown, tmp_path / "work", AWS_S3)
    assert "rerun preprocessing" in caught.value.message
    manifest = json.loads(
        (Path(json.loads(Path(assets.text()).read_text())["uri"]) / "manifest.json").read_text()
    )
    splits = {**manifest["splits"], "train": {**manifest["splits"]["train"], "rows": 0}}
    empty = _dataset_copy(assets.text(), tmp_path / "b", splits=splits)
    config = train_config(empty, tmp_path / "out")
    with pytest.raises(InvalidInput, match=r"^datasetPointer: .* has no training rows") as caught:
        train.prepare(config, tmp_path / "work")
    assert "data.train" in caught.value.message and "rerun preprocessing" in caught.value.message
    with pytest.raises(InvalidInput, match=r"^datasetPointer: .* no rows — check data.train"):
        data.StreamSampler(0, 1, 0, 10)


def test_block_rows_are_memory_mapped_and_exact(assets: Assets) -> None:
    dataset = data.open_dataset(assets.text(), assets.root / "checks", AWS_S3)
    split = dataset.split("train")
    assert split is not None and len(split) == dataset.rows("train")
    table = dataset.table("train")
    last = len(split) - 1
    item = split[last]
    assert item["row"] == last and item["input_ids"].dtype.name == "int64"
    assert item["input_ids"].tolist() == table.column("input_ids")[last].as_py()
    assert data.count_block_tokens(item) == sum(1 for x in item["labels"] if x != -100)


def test_stream_resumes_at_any_position_and_covers_each_epoch() -> None:
    rows, seed = 37, 5
    stream = list(data.StreamSampler(rows, seed, 0, 3 * rows + 11))
    for epoch in range(3):
        assert sorted(stream[epoch * rows : (epoch + 1) * rows]) == list(range(rows))
    assert stream[:rows] != stream[rows : 2 * rows]  # a new order every epoch
    for position in (0, 1, 36, 37, 60, 111):
        tail = list(data.StreamSampler(rows, seed, position, 3 * rows + 11))
        assert tail == stream[position:]
    assert list(data.StreamSampler(rows, seed + 1, 0, rows)) != stream[:rows]


def test_total_steps_from_epochs_follow_the_stream_position(tmp_path: Path) -> None:
    config = train_config("unused.json", tmp_path, training={"maxSteps": None, "epochs": 2.0})
    fresh = data.StreamPosition(start_step=0, start_sample=0, samples_per_step=8)
    assert train.total_steps(config, 100, fresh) == 25  # 200 samples / 8
    # Resumed at step 10 (80 samples) with twice the processes: 120 samples left, 16 per step.
    resumed = data.StreamPosition(start_step=10, start_sample=80, samples_per_step=16)
    assert train.total_steps(config, 100, resumed) == 10 + 8


@pytest.mark.parametrize("fp16", [True, False])
def test_fp16_overflows_are_tolerated_but_not_forever(fp16: bool) -> None:
    """fp16's loss scaler skips steps with an infinite gradient norm while it finds its scale."""
    from transformers import TrainerControl, TrainerState

    from kubetrain_trainer.callbacks import FP16_OVERFLOW_STEPS, HealthCallback

    health = HealthCallback(max_grad_norm_abort=1e6, gate=None, window=1, metrics=None, fp16=fp16)
    state, control = TrainerState(), TrainerControl()
    tolerated = FP16_OVERFLOW_STEPS if fp16 else 0
    for step in range(1, tolerated + 1):
        state.global_step = step
        health.on_log(None, state, control, logs={"loss": 5.0, "grad_norm": float("inf")})
    state.global_step = tolerated + 1
    with pytest.raises(StageFailure) as stopped:
        health.on_log(None, state, control, logs={"loss": 5.0, "grad_norm": float("inf")})
    assert stopped.value.exit_code == 3
    assert stopped.value.details["reason"] == "GradientExplosion"
