"""The memory model against a real GPU's peak: a ~300M-parameter Llama, full bf16 and LoRA.

Real: an NVIDIA GPU and PyTorch's caching allocator (torch.cuda.max_memory_allocated), a Llama
random-initialised by transformers from a config, PEFT LoRA through the trainer's attach_adapter,
the optimizer transformers' Trainer builds, activation checkpointing, block 2048, micro-batch 1,
three real steps (bench/memory_probe.run_steps, which bench/gpu.py uses too). Emulated: nothing.
Skipped where no GPU is visible; run with `pytest -m gpu` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from bench.memory_probe import run_steps, setup

from kubetrain_contract.memory import ModelShape, estimate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

#: ~300M parameters (301,507,584): large enough that model states and activations, not the
#: allocator's small blocks, make the peak.
SHAPE_300M = ModelShape(
    hidden_size=1024,
    layers=20,
    heads=16,
    kv_heads=8,
    intermediate_size=2816,
    vocab_size=32000,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(
    "changes",
    [{"adapter": "none"}, {"adapter": "lora"}],
    ids=["full-bf16-adamw_torch", "lora"],
)
def test_peak_allocated_is_within_15_percent_of_the_estimate(changes: dict[str, str]) -> None:
    s = setup(gpu=True, **changes)
    seen = run_steps(SHAPE_300M, s, "cuda", steps=3)
    expected = estimate(SHAPE_300M, s).allocated
    assert seen.allocated is not None
    assert abs(seen.allocated / expected - 1) <= 0.15, (seen.allocated, expected)
