"""The merge stage: adapters merged into the full-precision base, evaluated and exported.

Real: the preprocess and train stages producing the LoRA/QLoRA adapters, PEFT's merge_and_unload,
bitsandbytes 4-bit quantization (on CPU) for the adapter training and for the pre-quantized base
that must be refused, safetensors files, the `python -m kubetrain_trainer merge` entry point
(called in this process) and its exit code. Emulated: nothing. The evaluation on a GPU
(`test_merge_evaluates_on_the_gpu`, marked gpu) runs only where CUDA is; elsewhere it is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetrain_trainer import data, merge, model, train
from kubetrain_trainer.__main__ import main
from kubetrain_trainer.config import AWS_S3
from trainer_support import Assets, merge_config, train_config, write_config


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> None:
    """Training runs in this process here: torch on one thread."""
    torch.set_num_threads(1)


def _adapter_run(assets: Assets, root: Path, kind: str) -> Path:
    """Train an adapter for a few steps; returns the run's output directory."""
    config = train_config(
        assets.chat(),
        root,
        method="sft",
        model={"uri": str(assets.base_model())},
        adapter={"type": kind, "r": 8, "alpha": 16, "dropout": 0.0},
        training={"maxSteps": 6, "learningRate": 2e-2},
    )
    train.run(config, root / "work")
    return root


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merged_model_matches_the_adapter_model(assets: Assets, tmp_path: Path, kind: str) -> None:
    out = _adapter_run(assets, tmp_path / "run", kind)
    base = assets.base_model()
    config = merge_config(
        assets.chat(), str(base), out, adapter={"type": kind, "r": 8, "alpha": 16}
    )
    result = merge.run(config, tmp_path / "merge-work")
    merged_dir = out / "merged"
    assert result["outputs"]["merged"] == str(merged_dir)
    assert {"model.safetensors", "tokenizer.json", "README.md", "COMPLETE"} <= {
        p.name for p in merged_dir.iterdir()
    }
    assert not (merged_dir / "adapter_config.json").exists()

    from peft import PeftModel

    ids = torch.tensor([list(range(5, 69))])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        base_logits = plain(ids).logits
        adapted = PeftModel.from_pretrained(plain, str(out / "final")).eval()
        adapter_logits = adapted(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
        merged_logits = merged(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter changed something
    assert (adapter_logits - merged_logits).abs().max() <= 1e-5

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evalTokens"] > 0 and 1 < metrics["perplexity"] < 2000
    assert metrics["evalDevice"] == ("cuda" if torch.cuda.is_available() else "cpu")
    card = (out / "README.md").read_text()
    assert "validation perplexity" in card and str(base) in card


def test_merge_into_a_prequantized_base_is_refused(assets: Assets, tmp_path: Path) -> None:
    out = _adapter_run(assets, tmp_path / "run", "qlora")
    base = assets.base_model()

    # Declared quantized in the spec.
    declared = write_config(
        tmp_path / "declared.json",
        merge_config(
            assets.chat(), str(base), out, adapter={"type": "qlora"}, model={"quantized": True}
        ),
    )
    assert main(["merge", "--config", str(declared), "--workdir", str(tmp_path / "w1")]) == 2
    error = json.loads((tmp_path / "w1" / "result-merge.json").read_text())["error"]
    assert str(base) in error and "quantized" in error

    # Found in the base's own config.json: a real bitsandbytes 4-bit export of the base.
    quantized_dir = tmp_path / "base-4bit"
    model.load_pretrained(base, dtype=torch.float32, quantize="fp32").save_pretrained(quantized_dir)
    found = write_config(
        tmp_path / "found.json",
        merge_config(assets.chat(), str(quantized_dir), out, adapter={"type": "qlora"}),
    )
    assert main(["merge", "--config", str(found), "--workdir", str(tmp_path / "w2")]) == 2
    error = json.loads((tmp_path / "w2" / "result-merge.json").read_text())["error"]
    assert str(quantized_dir) in error and "bitsandbytes" in error
    assert not (out / "merged").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_merge_evaluates_on_the_gpu(assets: Assets, tmp_path: Path) -> None:
    """With a GPU the merged model is evaluated there, in the run's precision (bf16), and its
    perplexity is the one an fp32 evaluation on the CPU finds, to bf16's precision."""
    out = _adapter_run(assets, tmp_path / "run", "lora")
    config = merge_config(assets.chat(), str(assets.base_model()), out, precision="bf16")
    result = merge.run(config, tmp_path / "merge-work")
    assert result["evalDevice"] == "cuda"
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    assert next(merged.parameters()).device.type == "cpu"
    dataset = data.open_dataset(assets.chat(), tmp_path / "cpu-eval", AWS_S3)
    on_cpu = merge.perplexity(merged, dataset, 8)
    assert on_cpu["evalTokens"] == result["evalTokens"] > 0
    assert abs(result["perplexity"] / on_cpu["perplexity"] - 1) < 0.02
