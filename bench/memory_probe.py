"""Measured beside estimated: what bench/gpu.py and the memory tests share.

The memory model (kubetrain_contract.memory) predicts bytes by name; this module builds the same
models the trainer builds (transformers' Llama from a config, PEFT through kubetrain_trainer.model,
the optimizer through transformers' Trainer) and measures the tensors a real step leaves behind.
Nothing here re-derives the model's numbers: estimates come from `memory.estimate` only.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetrain_contract.layout import HUB_KERNELS_ENV
from kubetrain_contract.memory import ModelShape, Setup, estimate

# As the trainer's entry point does: no kernel code from the Hub (bitsandbytes would try).
os.environ.setdefault(HUB_KERNELS_ENV, "NO")

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


def model_shape(name: str) -> ModelShape:
    """A shape from the real config.json the examples ship (examples/models/NAME.json)."""
    return ModelShape.from_hf_config(json.loads((MODELS / f"{name}.json").read_text()))


#: Llama-3.1-8B: untied embeddings. Llama-3.2-1B: tied.
LLAMA_8B = model_shape("llama-3.1-8b")
LLAMA_1B = model_shape("llama-3.2-1b")
#: Parameter counts as published on the models' Hub pages (safetensors metadata).
PUBLISHED_PARAMETERS = {LLAMA_8B: 8_030_261_248, LLAMA_1B: 1_235_814_400}
#: The spec paths a refusal names (what the plan writes into Setup.paths).
PATHS = {
    "micro_batch_size": "spec.training.microBatchSize",
    "attention": "spec.training.attention",
    "reference": "spec.method.dpo.precomputeReferenceLogProbs",
    "weight_precision": "spec.training.weightPrecision",
    "gradient_checkpointing": "spec.training.gradientCheckpointing",
    "optimizer": "spec.training.optimizer",
    "zero_stage": "spec.distributed.zeroStage",
    "offload": "spec.distributed.offload",
}
#: The spec's default LoRA targets (operator api.DEFAULT_TARGET_MODULES) and rank.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_R = 16
#: The model-state terms (what DeepSpeed's estimators count).
MODEL_STATE_TERMS = (
    "weights",
    "adapter weights",
    "gradients",
    "fp32 gradients",
    "fp32 master weights",
    "optimizer state",
    "ZeRO-3 gathered layer",
)


def setup(**changes: Any) -> Setup:
    """One train stage on one GPU, bf16, LoRA off, GC on, block 2048: change what differs."""
    base = Setup(
        stage="train",
        where="spec",
        mode="train",
        method="sft",
        adapter="none",
        lora_r=LORA_R,
        target_modules=LORA_TARGETS,
        precision="bf16",
        weight_precision="bf16",
        optimizer="adamw_torch",
        zero_stage=0,
        offload=False,
        world_size=1,
        procs_per_node=1,
        micro_batch_size=1,
        block_size=2048,
        gradient_checkpointing=True,
        attention="sdpa",
        compile=False,
        reference="none",
        gpu=True,
        paths=PATHS,
    )
    return replace(base, **changes)


def model_states(shape: ModelShape, s: Setup) -> int:
    """The estimate's model-state bytes on the device (what DeepSpeed's estimators count)."""
    e = estimate(shape, s)
    return sum(e.term(name) for name in MODEL_STATE_TERMS)


# ------------------------------------------------------------------------ building as the trainer


def hf_config(shape: ModelShape, context: int = 131072, attention: str = "sdpa") -> Any:
    """transformers' LlamaConfig with the shape's numbers (random weights: no download)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=context,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    config._attn_implementation = attention
    return config


def dtype_of(name: str) -> Any:
    from kubetrain_trainer.model import DTYPES

    return DTYPES[name]


def build_model(shape: ModelShape, s: Setup, device: str, scratch: Path) -> Any:
    """The model a train stage holds: full (weights in weight_precision), LoRA on a base in the
    compute dtype, or QLoRA through from_pretrained with the trainer's BitsAndBytesConfig on a
    random bf16 model saved under `scratch` (the trainer's own load path); the adapter attached
    by kubetrain_trainer.model.attach_adapter, checkpointing enabled as Trainer enables it."""
    import torch
    from transformers import LlamaForCausalLM

    from kubetrain_trainer.config import AdapterConfig
    from kubetrain_trainer.model import attach_adapter, load_pretrained

    config = hf_config(shape, context=max(s.block_size, 64), attention=s.attention)
    if s.adapter == "qlora":
        with torch.device(device):
            random = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        random.save_pretrained(scratch)
        del random  # gone before the 4-bit load: its bf16 weights must not count in the peak
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = load_pretrained(
            scratch, dtype=dtype_of(s.precision), quantize=s.precision, device=device
        )
    else:
        dtype = s.precision if s.adapter == "lora" else s.weight_precision
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype_of(dtype))
    if s.adapter != "none":
        adapter = AdapterConfig(
            type=s.adapter,  # type: ignore[arg-type]
            r=s.lora_r,
            alpha=2.0 * s.lora_r,
            dropout=0.0,
            target_modules=list(s.target_modules),
        )
        model = attach_adapter(model, adapter, s.gradient_checkpointing)
    if s.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def build_optimizer(model: Any, optim: str) -> Any:
    """The optimizer transformers' Trainer builds for `optim` (its own class and kwargs)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.gettempdir(), optim=optim, use_cpu=True, report_to="none"
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def train_step(model: Any, optimizer: Any, s: Setup, device: str, vocab: int) -> float:
    """One real step on random token ids: forward (autocast in the compute dtype, as Trainer's
    bf16/fp16 does), the causal LM loss, backward, optimizer step; returns the loss. The last
    step's gradients are freed first, as Trainer's model.zero_grad() does, and the new ones are
    left for measuring."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    ids = torch.randint(0, vocab, (s.micro_batch_size, s.block_size), device=device)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    autocast = s.precision != "fp32"
    with torch.autocast(kind, dtype=dtype_of(s.precision), enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass
class Steps:
    """What `run_steps` saw: the model's config, timings, and the CUDA peaks over the steps."""

    config: Any
    build_seconds: float
    step_seconds: list[float]
    allocated: int | None
    reserved: int | None


def run_steps(shape: ModelShape, s: Setup, device: str, steps: int) -> Steps:
    """Build as the trainer does, then `steps` real steps. The CUDA peak statistics are reset
    once the model and optimizer are built (loading is not training) and read after the last
    step: the peak over steps 1..n, what a run sees."""
    import torch

    cuda = device.startswith("cuda")
    scratch = Path(tempfile.mkdtemp(prefix="kubetrain-memory-"))
    start = time.monotonic()
    try:
        torch.manual_seed(0)
        model = build_model(shape, s, device, scratch)
        optimizer = build_optimizer(model, s.optimizer)
        built = time.monotonic() - start
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            train_step(model, optimizer, s, device, shape.vocab_size)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peaks = (
            (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            if cuda
            else (None, None)
        )
        config = model.config
        del model, optimizer
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return Steps(config, built, times, *peaks)


# ------------------------------------------------------------------------------- tensor bytes


def _storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of distinct storages (tied weights and bnb's shared quantization maps once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _quant_state_tensors(p: Any) -> list[Any]:
    """bitsandbytes' 4-bit quantization state beside a packed weight: absmax, its own
    quantization (double quantization) and the code books."""
    state = getattr(p, "quant_state", None)
    if state is None:
        return []
    nested = [state.state2.absmax] if state.nested else []
    return [state.absmax, *nested, *_code_books(state)]


def _code_books(state: Any) -> list[Any]:
    """The per-weight constants of a 4-bit weight: its code books and the nested offset."""
    if not state.nested:
        return [state.code]
    return [state.code, state.state2.code, state.offset]


def tensor_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """What the step left behind, by the memory model's term names: frozen weights (with a
    4-bit base's quantization state), trainable weights (the adapter for LoRA), gradients, and
    optimizer state; 0-d state tensors (step counters, Adafactor's RMS) apart as "scalars"."""
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    quant = [t for p in frozen for t in _quant_state_tensors(p)]
    state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "nbytes")]
    adapter = any("lora_" in name for name, _ in model.named_parameters())
    out = {
        "gradients": _storage_bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer state": _storage_bytes(t for t in state if t.dim() > 0),
        "scalars": sum(t.nbytes for t in state if t.dim() == 0),
    }
    if adapter:
        out["weights"] = _storage_bytes(frozen + quant)
        out["adapter weights"] = _storage_bytes(trainable)
    else:
        out["weights"] = _storage_bytes(params)
    return out


def allowance(term: str, model: Any, s: Setup) -> int:
    """Bytes of `term` the memory model leaves out on purpose (measured - estimated must lie in
    [0, allowance]); 0 where it must match exactly. Each is a per-tensor constant, negligible
    on a real model and visible only on a tiny one:

    - QLoRA weights: bitsandbytes keeps, with every 4-bit weight, its 16-entry NF4 code book,
      the 256-entry fp32 code book of the nested (double) quantization and an fp32 offset, and
      rounds its fp32 constants up to whole blocks of 256 absmax values (NF4_BYTES is a rate
      per element): ≈1.1 KB per quantized linear, 0.25 MB for all of Llama-3.1-8B.
    - 8-bit Adam's state: bitsandbytes keeps 32-bit states (8 bytes per element) for tensors
      under its min_8bit_size of 4096 elements (tiny models' norms and LoRA matrices; a real
      model's norms have hidden_size ≥ 2048 elements, 16 KB in all), its two shared 256-entry
      fp32 quantization maps, and whole blocks of absmax (one fp32 per started 256 elements).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if term == "weights" and s.adapter == "qlora":
        quantized = [p for p in model.parameters() if hasattr(p, "quant_state")]
        books = sum(t.nbytes for p in quantized for t in _code_books(p.quant_state))
        return books + 8 * len(quantized)
    if term == "optimizer state" and s.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        small = sum(p.numel() for p in trainable if p.numel() < 4096)
        return 8 * small + 2 * 256 * 4 + 8 * len(trainable)
    if term == "scalars":
        return 4 * len(trainable)  # Adam's step counter, Adafactor's RMS: one fp32 each
    return 0


def validation_rows() -> list[tuple[str, str, int, int, int]]:
    """(case, term, estimated, measured, allowance) for every CPU case and term: the table of
    bench/gpu.py --dry-run and what tests/trainer/test_memory_measured.py asserts."""
    rows = []
    for name, shape, s in CPU_CASES:
        estimated, measured, model = measure(shape, s)
        for term, got in measured.items():
            rows.append((name, term, estimated.get(term, 0), got, allowance(term, model, s)))
    return rows


#: Tiny shapes for the CPU measurements: a tied and an untied vocabulary, GQA.
TINY = ModelShape(
    hidden_size=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate_size=128,
    vocab_size=512,
    tie_word_embeddings=False,
)
TINY_TIED = replace(TINY, tie_word_embeddings=True)
#: For the 8-bit optimizers: every matrix, LoRA's rank-16 ones included, at bitsandbytes'
#: min_8bit_size of 4096 elements or more, so the 8-bit layout is what is measured.
WIDE = replace(TINY, hidden_size=256, heads=4, kv_heads=4, intermediate_size=512)
#: The CPU validation cases: (name, shape, setup) for gpu=False, ZeRO 0, one process.
CPU_CASES: tuple[tuple[str, ModelShape, Setup], ...] = tuple(
    (name, shape, setup(gpu=False, block_size=32, micro_batch_size=2, **changes))
    for name, shape, changes in (
        ("full fp32 adamw_torch", TINY, {"weight_precision": "fp32"}),
        ("full bf16 adamw_torch", TINY, {}),
        ("full bf16 adamw_torch tied", TINY_TIED, {}),
        ("full bf16 adafactor", TINY, {"optimizer": "adafactor"}),
        ("full fp32 sgd", TINY, {"weight_precision": "fp32", "optimizer": "sgd"}),
        ("full bf16 adamw_8bit", WIDE, {"optimizer": "adamw_8bit"}),
        ("lora bf16 adamw_torch", TINY, {"adapter": "lora"}),
        ("lora bf16 adafactor", TINY, {"adapter": "lora", "optimizer": "adafactor"}),
        ("lora bf16 paged_adamw_8bit", WIDE, {"adapter": "lora", "optimizer": "paged_adamw_8bit"}),
        ("qlora bf16 adamw_torch", TINY, {"adapter": "qlora"}),
    )
)


def measure(shape: ModelShape, s: Setup) -> tuple[dict[str, int], dict[str, int], Any]:
    """(estimated terms, measured terms, the model) after one real step on CPU."""
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="kubetrain-memory-") as scratch:
        model = build_model(shape, s, "cpu", Path(scratch))
    optimizer = build_optimizer(model, s.optimizer)
    train_step(model, optimizer, s, "cpu", shape.vocab_size)
    measured = tensor_bytes(model, optimizer)
    e = estimate(shape, s)
    estimated = {name: e.term(name) for name in measured if name != "scalars"}
    return estimated, measured, model
