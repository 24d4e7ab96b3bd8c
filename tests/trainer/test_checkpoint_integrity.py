"""Checkpoints that are really complete, and resumed only where they fit.

Real: the train stage (`python -m kubetrain_trainer train` forked from the warm launcher, or under
`torchrun --standalone` for one and two processes with DeepSpeed ZeRO-2 and the operator's
DeepSpeed config), HF Trainer's checkpoints, sha256 of real files, a real `moto_server` for the
upload thread's node markers. Emulated: a damaged disk — the test overwrites bytes of a finished
checkpoint in place (same size), as a torn copy or a bad sector would.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubetrain_contract.exit_codes import EXIT_INVALID
from kubetrain_contract.layout import ATTEMPT_ENV, checkpoint_name
from kubetrain_trainer import checkpoint, storage
from kubetrain_trainer.config import S3Settings
from trainer_support import (
    Assets,
    Launcher,
    losses,
    operator_deepspeed,
    result,
    resumed_step,
    torchrun,
    train_config,
    write_config,
)

pytestmark = pytest.mark.slow

TRAINING = {"maxSteps": 10, "microBatchSize": 4, "gradientAccumulationSteps": 2}


@pytest.fixture(scope="module")
def small_text(assets: Assets) -> str:
    return assets.stdlib_text(
        "small-text",
        30_000,
        {"tokenizer": {"train": {"vocabSize": 600, "specialTokens": ["<|endoftext|>"]}}},
    )


def _config(root: Path, pointer: str, name: str = "train.json", **changes: Any) -> Path:
    training = {**TRAINING, **changes.pop("training", {})}
    return write_config(
        root / name,
        train_config(
            pointer,
            root / "out",
            training=training,
            checkpoints={"everySteps": 5, "keep": 3},
            **changes,
        ),
    )


@pytest.fixture(scope="module")
def trained(small_text: str, launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 steps with checkpoints at 5 and 10 (the run the tests resume or refuse to resume)."""
    root = tmp_path_factory.mktemp("trained")
    code, output = launcher.run("train", _config(root, small_text), root / "work")
    assert code == 0, output[-3000:]
    return root


def _copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "out", tmp_path / "out")
    return tmp_path


def test_complete_records_a_checksum_for_every_file(trained: Path) -> None:
    step = trained / "out" / "checkpoints" / "step-00000010"
    meta = json.loads((step / "COMPLETE").read_text())
    on_disk = {p.relative_to(step).as_posix(): p for p in step.rglob("*") if p.is_file()}
    on_disk.pop("COMPLETE")
    assert set(meta["files"]) == set(on_disk)
    for rel, entry in meta["files"].items():
        path = on_disk[rel]
        assert entry == {"bytes": path.stat().st_size, "sha256": storage.sha256_file(path)}
    assert meta["method"] == "pretrain" and meta["globalBatch"] == 8 and meta["zeroStage"] == 0


def test_a_same_size_corruption_falls_back_to_the_previous_checkpoint(
    trained: Path, small_text: str, launcher: Launcher, tmp_path: Path
) -> None:
    root = _copy(trained, tmp_path)
    weights = root / "out" / "checkpoints" / "step-00000010" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 256] = bytes(256)  # zeroed in place: the size is kept
    weights.write_bytes(bytes(raw))
    config = _config(root, small_text, training={"maxSteps": 15})
    code, output = launcher.run("train", config, root / "work")
    assert code == 0, output[-3000:]
    assert "step-00000010 failed verification" in output
    assert "model.safetensors does not match its sha256" in output
    assert resumed_step(output) == 5
    assert result(root / "work")["step"] == 15


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"training": {"microBatchSize": 2}}, "globalBatch 8, the run now has 4"),
        ({"method": "sft"}, "method 'pretrain', the run now has 'sft'"),
        ({"dataset": True}, "dataset"),
    ],
)
def test_a_checkpoint_of_another_run_shape_is_refused(
    trained: Path,
    small_text: str,
    assets: Assets,
    launcher: Launcher,
    tmp_path: Path,
    changes: dict[str, Any],
    says: str,
) -> None:
    root = _copy(trained, tmp_path)
    pointer = assets.text() if changes.pop("dataset", False) else small_text
    code, output = launcher.run("train", _config(root, pointer, **changes), root / "work")
    assert code == EXIT_INVALID, output[-3000:]
    error = result(root / "work")["error"]
    assert "step-00000010: this checkpoint has " in error and says in error, error
    assert "new output.uri" in error


def test_a_stale_node_marker_of_an_earlier_attempt_never_completes_a_checkpoint(
    moto_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    storage.client(s3).create_bucket(Bucket=bucket)
    remote = f"s3://{bucket}/out/checkpoints"
    step = tmp_path / "step-00000005"
    step.mkdir()
    (step / "model.safetensors").write_bytes(b"node 0's part")
    checkpoint.write_marker(step, {"step": 5, "attempt": 2, "files": checkpoint.files_of(step)})
    # Node 1 of attempt 1 uploaded its part of the same step before that attempt died.
    node1 = storage.join(remote, "step-00000005", "NODE-1.json")
    storage.write_text(node1, json.dumps({"files": {}, "attempt": 1}), s3)
    monkeypatch.setenv(ATTEMPT_ENV, "2")
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0,))
    completed: list[int] = []
    uploader = checkpoint.Uploader(
        remote_root=remote,
        s3=s3,
        node=0,
        nodes=2,
        keep=2,
        metrics=None,
        on_complete=lambda step, seconds: completed.append(step),
    )
    uploader.node_wait = 0.5
    with caplog.at_level(logging.WARNING):
        uploader.submit(step, 0.0)
        uploader.drain()
    assert completed == []
    assert not storage.exists(storage.join(remote, "step-00000005", "COMPLETE"), s3)
    assert "did not finish its upload of attempt 2" in caplog.text
    # Node 1 of attempt 2 finishes: now the checkpoint completes.
    storage.write_text(node1, json.dumps({"files": {}, "attempt": 2}), s3)
    uploader = checkpoint.Uploader(
        remote_root=remote,
        s3=s3,
        node=0,
        nodes=2,
        keep=2,
        metrics=None,
        on_complete=lambda step, seconds: completed.append(step),
    )
    uploader.submit(step, 0.0)
    uploader.drain()
    assert completed == [5]
    assert storage.exists(storage.join(remote, "step-00000005", "COMPLETE"), s3)


def _zero2(root: Path, pointer: str, processes: int, name: str, steps: int) -> Path:
    """ZeRO-2 on `processes` processes, 8 samples per step either way."""
    return _config(
        root,
        pointer,
        name=name,
        training={"maxSteps": steps, "gradientAccumulationSteps": 2 // processes},
        distributed={
            "zeroStage": 2,
            "worldSize": processes,
            "deepspeed": operator_deepspeed(2),
        },
    )


@pytest.fixture(scope="module")
def zero2_reference(small_text: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """15 steps of ZeRO-2 on one process, uninterrupted: the losses a resume must reproduce."""
    root = tmp_path_factory.mktemp("zero2-reference")
    done = torchrun(_zero2(root, small_text, 1, "ref.json", 15), root / "work", nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(root / "work")


@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 1)])
def test_a_zero2_checkpoint_resumes_on_another_process_count_through_a_universal_checkpoint(
    small_text: str, zero2_reference: dict[int, float], tmp_path: Path, first: int, then: int
) -> None:
    done = torchrun(_zero2(tmp_path, small_text, first, "a.json", 10), tmp_path / "a", nproc=first)
    assert done.returncode == 0, done.stderr[-3000:]
    step = tmp_path / "out" / "checkpoints" / "step-00000010"
    assert (step / "COMPLETE").exists() and not (step / "latest_universal").exists()
    resumed = torchrun(_zero2(tmp_path, small_text, then, "b.json", 15), tmp_path / "b", nproc=then)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert f"resuming {then} processes from a checkpoint of {first} (universal checkpoint)" in said
    assert (step / "latest_universal").exists()
    got = losses(tmp_path / "b")
    assert sorted(got) == list(range(11, 16))
    # The optimizer state came along: steps after the first one match the uninterrupted run.
    assert max(abs(got[s] - zero2_reference[s]) for s in got) <= 1e-4, (got, zero2_reference)


def test_a_changed_zero_stage_on_another_process_count_is_refused(
    small_text: str, tmp_path: Path
) -> None:
    done = torchrun(_zero2(tmp_path, small_text, 1, "a.json", 10), tmp_path / "a", nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    zero1 = _config(
        tmp_path,
        small_text,
        name="b.json",
        training={"maxSteps": 15, "gradientAccumulationSteps": 1},
        distributed={"zeroStage": 1, "worldSize": 2, "deepspeed": operator_deepspeed(1)},
    )
    refused = torchrun(zero1, tmp_path / "b", nproc=2)
    assert refused.returncode != 0
    error = result(tmp_path / "b")["error"]
    assert result(tmp_path / "b")["exitCode"] == EXIT_INVALID
    assert "written by 1 processes under ZeRO stage 2, this run has 2 under stage 1" in error


def test_a_corrupted_object_in_the_bucket_falls_back_after_the_download(
    moto_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    storage.client(s3).create_bucket(Bucket=bucket)
    remote = f"s3://{bucket}/out/checkpoints"
    for step in (5, 10):
        local = tmp_path / "made" / checkpoint_name(step)
        local.mkdir(parents=True)
        (local / "model.safetensors").write_bytes(bytes(range(256)) * (16 + step))
        checkpoint.write_marker(local, {"step": step, "files": checkpoint.files_of(local)})
        storage.upload_dir(local, storage.join(remote, local.name), s3, marker=checkpoint.MARKER)
    newest = storage.join(remote, "step-00000010", "model.safetensors")
    size = storage.size(newest, s3)
    storage.write_text(newest, "x" * size, s3)  # same size, other bytes: the object is damaged
    with caplog.at_level(logging.WARNING):
        chosen = checkpoint.resume_point(
            tmp_path / "staging", remote, s3, leader=True, is_rank_zero=True, nodes=1
        )
    assert chosen == tmp_path / "staging" / "step-00000005"
    assert "step-00000010 failed verification" in caplog.text
    assert checkpoint.read_marker(chosen, verify=True) is not None
