"""The trainer's fit checks (fit.py): the preprocess stage sizes the model from its config.json
alone (or the tokenizer) and refuses a run that cannot fit before it tokenizes anything; the
device check keeps its estimate on CPU; flash_attention_2 without flash-attn is refused.

Real: the preprocess stage in this process on standard-library text, the memory model of
kubetrain_contract, a config.json as transformers writes it for a Llama-3.1-8B shape. Emulated:
nothing (S3 and the Hub are covered in test_preprocess_s3.py and test_hub.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubetrain_contract import memory
from kubetrain_trainer import fit, model
from kubetrain_trainer.stage import InvalidInput
from preprocess_support import config, docs, run_stage, tokenizer_dir, write_jsonl
from stage_base import base_config

GIB = 1024**3
#: meta-llama/Llama-3.1-8B's config.json, the keys the memory model reads.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def setups(**train: Any) -> list[dict[str, Any]]:
    """The planned train and merge setups, on a GPU, with `train` changed."""
    planned = base_config("train")["memory"]["setup"]
    merge = base_config("merge")["memory"]["setup"]
    return [{**planned, "gpu": True, **train}, {**merge, "gpu": True}]


def fit_request(model_uri: str | None, **train: Any) -> dict[str, Any]:
    return {
        "gpuMemoryBytes": 80 * GIB,
        "gpuMemorySource": "resources.gpuMemory",
        "modelUri": model_uri,
        "architecture": None,
        "setups": setups(**train),
    }


def model_dir(tmp_path: Path, config_json: dict[str, Any] = LLAMA_8B) -> Path:
    directory = tmp_path / "llama-8b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_json), encoding="utf-8")
    return directory


def texts(tmp_path: Path) -> str:
    return str(write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in docs()[:200]]))


def test_a_run_that_cannot_fit_is_refused_before_tokenizing(tmp_path: Path) -> None:
    """Full fine-tune of 8B in fp32 with AdamW on one 80 GiB GPU: ~16 bytes a parameter."""
    uri = str(model_dir(tmp_path))
    cfg = config(tmp_path, [texts(tmp_path)], fit=fit_request(uri, weight_precision="fp32"))
    with pytest.raises(InvalidInput) as refused:
        run_stage(cfg, tmp_path / "work")
    message = refused.value.message
    expected = memory.refusal(
        memory.estimate(
            memory.ModelShape.from_hf_config(LLAMA_8B),
            memory.Setup.from_dict(fit_request(uri)["setups"][0]),
        ),
        memory.ModelShape.from_hf_config(LLAMA_8B),
        80 * GIB,
        "resources.gpuMemory",
    )
    assert message.splitlines()[0] == f"spec.training: {expected}"
    assert "fits with:" in message or "no single setting" in message
    rows = refused.value.details["fit"]
    assert [(r["stage"], r["fits"]) for r in rows] == [("train", False), ("merge", True)]
    # Nothing was tokenized or published: no pointer, no dataset, not even a staging directory.
    assert not Path(cfg["datasetPointer"]).exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.arrow"))


def test_a_run_that_fits_puts_the_table_in_the_result(tmp_path: Path) -> None:
    uri = str(model_dir(tmp_path))
    request = fit_request(uri, adapter="lora", precision="bf16")
    result = run_stage(config(tmp_path, [texts(tmp_path)], fit=request), tmp_path / "work")
    shape = memory.ModelShape.from_hf_config(LLAMA_8B)
    assert result["fit"] == [
        memory.row(memory.estimate(shape, memory.Setup.from_dict(s)), 80 * GIB)
        for s in request["setups"]
    ]
    assert [r["fits"] for r in result["fit"]] == [True, True]
    assert result["trainRows"] > 0


def test_an_architecture_is_sized_with_the_tokenizers_vocabulary(tmp_path: Path) -> None:
    arch = {**base_config("train")["model"]["architecture"], "vocabSize": None}
    request = {**fit_request(None), "architecture": arch}
    result = run_stage(config(tmp_path, [texts(tmp_path)], fit=request), tmp_path / "work")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json")).get_vocab_size(True)
    shape = memory.ModelShape(
        hidden_size=arch["hiddenSize"],
        layers=arch["layers"],
        heads=arch["heads"],
        kv_heads=arch["kvHeads"],
        intermediate_size=arch["intermediateSize"],
        vocab_size=vocab,
        tie_word_embeddings=arch["tieWordEmbeddings"],
    )
    setup = memory.Setup.from_dict(request["setups"][0])
    assert result["fit"][0]["estimateBytes"] == memory.estimate(shape, setup).total


def test_a_config_json_linked_out_of_the_model_directory_is_refused_unread(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(LLAMA_8B), encoding="utf-8")
    directory = tmp_path / "model"
    directory.mkdir()
    os.symlink(secret, directory / "config.json")
    cfg = config(tmp_path, [texts(tmp_path)], fit=fit_request(str(directory)))
    with pytest.raises(InvalidInput, match=r"model\.uri: .*config\.json: is a link to .*outside"):
        run_stage(cfg, tmp_path / "work")
    assert not Path(cfg["datasetPointer"]).exists()


def test_an_oversized_or_foreign_config_json_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_bytes(b" " * (fit.CONFIG_LIMIT + 1))
    with pytest.raises(InvalidInput, match=r"model\.uri: .* larger than any model config"):
        fit.read_model_config(str(big), _s3(), tmp_path, "model.uri")
    foreign = model_dir(tmp_path, {"model_type": "bert", "hidden_size": 768})
    with pytest.raises(InvalidInput, match=r"model\.uri: .*num_attention_heads: expected"):
        fit.check_request(_request(str(foreign)), _s3(), tmp_path, None)
    with pytest.raises(InvalidInput, match=r"model\.uri: .* does not exist|no such file"):
        fit.read_model_config(str(tmp_path / "absent"), _s3(), tmp_path, "model.uri")


def test_the_device_check_on_cpu_keeps_the_estimate(tmp_path: Path) -> None:
    setup = memory.Setup.from_dict(setups()[0])
    shape = fit.shape_of_dir(model_dir(tmp_path), "model.uri")
    assert shape == memory.ModelShape.from_hf_config(LLAMA_8B)
    estimate = fit.check_device(setup, shape, 0)  # 8B in fp32: far over any GPU, no GPU here
    assert estimate is not None and estimate.total == memory.estimate(shape, setup).total
    assert fit.check_device(setup, None, 0) is None


def test_flash_attention_without_flash_attn_is_refused() -> None:
    with pytest.raises(InvalidInput) as refused:
        model.attention("flash_attention_2", "training.attention")
    assert refused.value.message.startswith("training.attention: flash_attention_2 needs")
    assert "install flash-attn" in refused.value.message and "use sdpa" in refused.value.message
    assert model.attention("eager", "training.attention") == "eager"


def _s3() -> Any:
    from kubetrain_trainer.config import AWS_S3

    return AWS_S3


def _request(uri: str) -> Any:
    from kubetrain_trainer.config import FitRequest

    return FitRequest.model_validate(fit_request(uri), by_alias=True)


@pytest.mark.slow
def test_an_s3_model_is_sized_from_its_config_object_alone(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """Only config.json is read: the weights beside it are not (here: not even there)."""
    import uuid

    from kubetrain_trainer import storage
    from kubetrain_trainer.config import S3Settings

    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"fit-{uuid.uuid4().hex[:10]}"
    storage.client(s3).create_bucket(Bucket=bucket)
    storage.upload_file(model_dir(tmp_path) / "config.json", f"s3://{bucket}/m/config.json", s3)
    wire = s3.model_dump(by_alias=True)
    request = fit_request(f"s3://{bucket}/m", weight_precision="fp32")
    cfg = config(tmp_path, [texts(tmp_path)], fit=request, s3=wire)
    with pytest.raises(InvalidInput, match=r"^spec\.training: train on 1 process\(es\) needs"):
        run_stage(cfg, tmp_path / "work")
    assert not Path(cfg["datasetPointer"]).exists()
    lora = fit_request(f"s3://{bucket}/m", adapter="lora")
    result = run_stage(config(tmp_path, [texts(tmp_path)], fit=lora, s3=wire), tmp_path / "w2")
    assert [r["fits"] for r in result["fit"]] == [True, True]
    with pytest.raises(InvalidInput, match=r"model\.uri: .*s3://.*/absent.* save_pretrained"):
        fit.read_model_config(f"s3://{bucket}/absent", s3, tmp_path, "model.uri")
