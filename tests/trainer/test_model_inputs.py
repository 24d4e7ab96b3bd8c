"""Inputs no retry can fix end the stage with exit 2 naming the field or file, not a crash (exit 1).

Real: the trainer's stage-config parser (`config.parse_stage_config`, whose ConfigError the entry
point turns into exit 2), `model.load_pretrained` on a tiny Llama saved by transformers' own
`save_pretrained` (then truncated, overwritten or replaced by a pickle), `storage.download_dir`
against a real `moto_server`. Nothing is emulated; the hostile files are written here.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetrain_contract.exit_codes import EXIT_INVALID
from kubetrain_trainer import model, storage
from kubetrain_trainer.config import ConfigError, S3Settings, parse_stage_config
from kubetrain_trainer.stage import InvalidInput
from stage_base import base_config, changed


class Payload:
    """Unpickled, it creates `path`: proof that a pickle's code ran (no shell needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (pathlib.Path.touch, (self.path,))


def test_a_step_count_past_the_cap_exits_2_naming_the_field() -> None:
    """The entry point answers ConfigError with exit 2 (its own tests); in-process here, as
    `main` would start a process (ldconfig, for the parent-death signal)."""
    config = changed(base_config("train"), {"training": {"maxSteps": 4_000_000_000_000_000_000}})
    with pytest.raises(ConfigError) as refused:
        parse_stage_config(config, "train.json")
    assert "train.json: training.maxSteps:" in str(refused.value)
    assert "1000000000" in str(refused.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_bytes((saved / "config.json").read_bytes())
    return target


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_unreadable_safetensors_exit_2_naming_the_file(
    saved: Path, tmp_path: Path, damage: str
) -> None:
    target = _copy(saved, tmp_path)
    weights = (saved / "model.safetensors").read_bytes()
    broken = weights[: len(weights) // 2] if damage == "truncated" else os.urandom(4096)
    (target / "model.safetensors").write_bytes(broken)
    with pytest.raises(InvalidInput) as refused:
        model.load_pretrained(target, dtype=torch.float32)
    assert refused.value.exit_code == EXIT_INVALID
    assert f"model.uri: {target / 'model.safetensors'}" in refused.value.message


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickled_bin_exits_2_and_its_payload_never_runs(
    saved: Path, tmp_path: Path, writer: str
) -> None:
    target, ran = _copy(saved, tmp_path), tmp_path / "payload-ran"
    with (target / "pytorch_model.bin").open("wb") as out:
        (torch.save if writer == "torch.save" else pickle.dump)({"w": Payload(ran)}, out)
    with pytest.raises(InvalidInput) as refused:
        model.load_pretrained(target, dtype=torch.float32)
    assert refused.value.exit_code == EXIT_INVALID
    assert str(target / "pytorch_model.bin") in refused.value.message
    assert not ran.exists()


def test_a_key_that_is_another_keys_directory_exits_2_naming_both(
    moto_endpoint: str, tmp_path: Path
) -> None:
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    client = storage.client(s3)
    client.create_bucket(Bucket=bucket)
    for key in ("base/config.json", "base/config.json/x"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    with pytest.raises(storage.Refused) as refused:
        storage.download_dir(f"s3://{bucket}/base", tmp_path / "dest", s3)
    assert refused.value.exit_code == EXIT_INVALID
    message = refused.value.message
    assert f"s3://{bucket}/base/config.json and s3://{bucket}/base/config.json/x" in message
    assert not (tmp_path / "dest").exists()  # refused before anything is fetched
