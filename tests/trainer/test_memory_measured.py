"""The memory model's terms against tensor bytes measured after one real optimizer step on CPU.

Real: tiny Llama models built by transformers from configs (random init), PEFT LoRA through
kubetrain_trainer.model.attach_adapter, QLoRA's base quantized by bitsandbytes' 4-bit CPU kernels
through the trainer's own load_pretrained, the optimizers transformers' Trainer builds for
adamw_torch, adafactor, sgd and bitsandbytes' (paged) 8-bit AdamW (which runs on CPU in
bitsandbytes 0.50), one forward, backward and step on a real batch. Measured: parameter,
gradient and optimizer-state storages (distinct storages: tied weights and shared maps once).
Emulated: nothing; no GPU here, so peaks are bench/gpu.py's (and test_memory_gpu.py's) job.
The per-term allowances, and why each exists, are in bench/memory_probe.py's `allowance`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from functools import cache
from typing import Any

import pytest
import torch
from bench.memory_probe import (
    CPU_CASES,
    LLAMA_1B,
    LLAMA_8B,
    MODEL_STATE_TERMS,
    PUBLISHED_PARAMETERS,
    allowance,
    hf_config,
    measure,
)

from kubetrain_contract.memory import ModelShape, Setup, estimate

CASES = {name: (shape, s) for name, shape, s in CPU_CASES}


@cache
def _measured(case: str) -> tuple[dict[str, int], dict[str, int], Any]:
    shape, s = CASES[case]
    return measure(shape, s)


@pytest.mark.parametrize("case", list(CASES))
def test_every_model_state_term_matches_the_measured_bytes(case: str) -> None:
    """Weights, adapter weights, gradients and optimizer state: exact, or over by no more than
    the documented allowance (bitsandbytes' per-tensor constants)."""
    _, s = CASES[case]
    estimated, measured, model = _measured(case)
    for term, got in measured.items():
        if term == "scalars":
            continue
        excess = got - estimated[term]
        assert 0 <= excess <= allowance(term, model, s), (term, estimated[term], got)


@pytest.mark.parametrize("case", list(CASES))
def test_nothing_measured_is_left_out_of_the_estimate(case: str) -> None:
    """Every model-state term the estimate has was measured, and the measured tensors beside
    them are only 0-d scalars (step counters, Adafactor's RMS): 4 bytes per trainable tensor."""
    shape, s = CASES[case]
    _, measured, model = _measured(case)
    e = estimate(shape, s)
    assert {t.name for t in e.terms if t.name in MODEL_STATE_TERMS} <= set(measured)
    assert measured["scalars"] <= allowance("scalars", model, s)


def test_the_measurement_sees_a_wrong_estimate() -> None:
    """The comparison can fail: the same model measured against an estimate of a bf16 model
    for fp32 weights is off by half of every term."""
    shape, s = CASES["full fp32 adamw_torch"]
    _, measured, model = _measured("full fp32 adamw_torch")
    wrong = estimate(shape, Setup.from_dict({**s.to_dict(), "weight_precision": "bf16"}))
    assert measured["weights"] - wrong.term("weights") > allowance("weights", model, s)


@pytest.mark.parametrize("shape", [LLAMA_8B, LLAMA_1B], ids=["8b", "1b"])
def test_parameters_equal_transformers_model_built_on_meta(shape: ModelShape) -> None:
    """The count from the shape equals sum(p.numel()) of transformers' LlamaForCausalLM built
    from the same config on the meta device (no memory), and the published count."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(shape))
    assert sum(p.numel() for p in model.parameters()) == shape.parameters
    assert shape.parameters == PUBLISHED_PARAMETERS[shape]


@pytest.mark.parametrize("shape", [LLAMA_8B, LLAMA_1B], ids=["8b", "1b"])
def test_the_shape_of_a_config_json_is_the_shape_it_was_built_from(shape: ModelShape) -> None:
    """ModelShape.from_hf_config reads what transformers writes into config.json (which
    spells out head_dim, hidden_size / heads for Llama)."""
    parsed = ModelShape.from_hf_config(hf_config(shape).to_dict())
    assert replace(parsed, head_dim=None) == shape
    assert parsed.head_size == shape.head_size and parsed.parameters == shape.parameters


@pytest.mark.slow  # starts a process
def test_the_gpu_proof_dry_run_prints_its_tables() -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| part | shape | est. allocated | max allocated |" in done.stdout
    assert "skipped on CPU: needs CUDA" in done.stdout
    assert "| case | term | estimated | measured |" in done.stdout
    assert done.stdout.count("| QLoRA |") == 2
