"""The GPU proof: the memory model's estimates beside a real GPU's peaks, and throughput.

    python bench/gpu.py              # on one 80 GB GPU: at most 8 minutes, no downloads
    python bench/gpu.py --dry-run    # the same code on CPU with tiny shapes, under a minute
    python bench/gpu.py --validate   # also the CPU tensor-bytes validation table

Prints one markdown table (docs/fit.md keeps every run's):
- the `gpu` tests (`pytest -q -m gpu tests/` in a subprocess): passed and failed counts;
- full fine-tune (bf16 weights, adamw_torch: plain torch, no bitsandbytes kernel in the way, and
  it fits the ~1B model), LoRA and QLoRA on Llama-3.2-1B's shape, LoRA and QLoRA on
  Llama-3.1-8B's: `memory.estimate(...).allocated` against `torch.cuda.max_memory_allocated`
  and `.total` less the CUDA context against `max_memory_reserved`, each with its ratio (goal:
  within ±15%). Models are random-initialised from the real configurations, built on the GPU in
  bf16; QLoRA saves that random bf16 model under /tmp and loads it back through the trainer's
  own `load_pretrained` with its BitsAndBytesConfig (the load is timed). LoRA through
  `kubetrain_trainer.model.attach_adapter`, the optimizer as transformers' Trainer builds it,
  activation checkpointing on, block 2048, micro-batch 1, STEPS real steps on random token ids;
  the peak is over all of them (reset once the model is built: loading is not training);
- tokens per second and MFU for the 8B LoRA and the 1B full step (kubetrain_trainer.callbacks'
  flops_per_token and peak_flops, as the trainer's metrics), from the steps after the first.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

import memory_probe as probe  # noqa: E402  (bench/ is not a package)
from kubetrain_contract.memory import GIB, ModelShape, estimate  # noqa: E402

STEPS = 4
#: Seconds each part may take on one 80 GB GPU (8 minutes in all); a part that would start
#: after the whole budget is spent is reported as skipped.
BUDGET_S = {"gpu tests": 180, "1b": 60, "8b lora": 60, "8b qlora": 150}
TOTAL_BUDGET_S = 8 * 60
#: Tiny stand-ins for the dry run: the same code path, shapes a CPU steps in seconds.
DRY_1B = ModelShape(
    hidden_size=128,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate_size=256,
    vocab_size=1024,
    tie_word_embeddings=True,
)
DRY_8B = ModelShape(
    hidden_size=256,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate_size=512,
    vocab_size=2048,
    tie_word_embeddings=False,
)
HEADER = (
    "| part | shape | est. allocated | max allocated | ratio | est. reserved | max reserved "
    "| ratio | tokens/s | MFU | seconds | note |"
)
CPU_SKIP = "skipped on CPU: needs CUDA"


@dataclass
class Row:
    part: str
    shape: str
    estimated: int | None = None
    allocated: int | None = None
    estimated_reserved: int | None = None
    reserved: int | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    seconds: float = 0.0
    note: str = ""

    def cells(self) -> list[str]:
        def size(n: int | None) -> str:
            return "—" if n is None else f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n:,} B"

        def ratio(measured: int | None, estimated: int | None) -> str:
            return "—" if not measured or not estimated else f"{measured / estimated:.2f}"

        return [
            self.part,
            self.shape,
            size(self.estimated),
            size(self.allocated),
            ratio(self.allocated, self.estimated),
            size(self.estimated_reserved),
            size(self.reserved),
            ratio(self.reserved, self.estimated_reserved),
            "—" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}",
            "—" if self.mfu is None else f"{self.mfu:.1%}",
            f"{self.seconds:.1f}",
            self.note,
        ]


def markdown(header: str, rows: list[list[str]]) -> str:
    width = header.count("|") - 1
    return "\n".join([header, "|" + "---|" * width, *("| " + " | ".join(r) + " |" for r in rows)])


def gpu_tests(dry: bool, budget: float) -> Row:
    """`pytest -q -m gpu tests/` as a subprocess: its summary line's counts."""
    if dry:
        return Row("gpu tests", "—", note=CPU_SKIP)
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=budget,
        )
        tail = (done.stdout + done.stderr).strip().splitlines()
        counts = re.findall(r"(\d+) (passed|failed|error|errors|skipped)", tail[-1] if tail else "")
        note = ", ".join(f"{n} {what}" for n, what in counts) or f"exit {done.returncode}"
        failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
        note += "".join(f"; {line[:120]}" for line in failed[:3])
    except subprocess.TimeoutExpired:
        note = f"timed out after {budget:.0f} s"
    return Row("gpu tests", "—", seconds=time.monotonic() - start, note=note)


def peak(part: str, name: str, shape: ModelShape, device: str, speed: bool, **changes: Any) -> Row:
    """STEPS real steps (memory_probe.run_steps): the peaks beside the estimate, and the speed."""
    import torch

    from kubetrain_trainer.callbacks import flops_per_token, peak_flops

    cuda = device.startswith("cuda")
    s = probe.setup(gpu=cuda, **changes)
    e = estimate(shape, s)
    row = Row(part, name, estimated=e.allocated)
    row.estimated_reserved = e.total - e.term("CUDA context") if cuda else None
    start = time.monotonic()
    try:
        seen = probe.run_steps(shape, s, device, STEPS)
    except torch.cuda.OutOfMemoryError as error:
        row.seconds = time.monotonic() - start
        row.note = f"out of memory: {str(error).splitlines()[0][:100]}"
        return row
    row.seconds = time.monotonic() - start
    notes = [f"built, saved and 4-bit loaded in {seen.build_seconds:.0f} s"] * (
        s.adapter == "qlora"
    )
    row.allocated, row.reserved = seen.allocated, seen.reserved
    if row.allocated is None:
        notes.append("no CUDA allocator on CPU: estimate only")
    else:
        within = abs(row.allocated / e.allocated - 1) <= 0.15
        notes.append("allocated within ±15%" if within else "allocated OUTSIDE ±15%")
    if speed:
        row.tokens_per_s = (
            s.micro_batch_size * s.block_size / statistics.median(seen.step_seconds[1:])
        )
        per_token = flops_per_token(seen.config, s.block_size, adapter=s.adapter != "none")
        top = peak_flops(torch.cuda.get_device_name() if cuda else "cpu", s.precision)
        if per_token is not None and top is not None:
            row.mfu = per_token * row.tokens_per_s / top
    row.note = "; ".join(notes)
    return row


def proof(dry: bool) -> list[Row]:
    """Every row, in budget order; a part that would start past the total budget is skipped."""
    device = "cpu" if dry else "cuda"
    small, large = (DRY_1B, DRY_8B) if dry else (probe.LLAMA_1B, probe.LLAMA_8B)
    names = (
        ("tiny (1B stand-in)", "tiny (8B stand-in)") if dry else ("Llama-3.2-1B", "Llama-3.1-8B")
    )
    block = {"block_size": 128} if dry else {}
    parts: list[tuple[str, Any]] = [
        ("gpu tests", lambda: gpu_tests(dry, BUDGET_S["gpu tests"])),
        (
            "full bf16 adamw_torch",
            lambda: peak("full bf16", names[0], small, device, True, **block),
        ),
        ("lora", lambda: peak("LoRA", names[0], small, device, False, adapter="lora", **block)),
        ("qlora", lambda: peak("QLoRA", names[0], small, device, False, adapter="qlora", **block)),
        ("8b lora", lambda: peak("LoRA", names[1], large, device, True, adapter="lora", **block)),
        (
            "8b qlora",
            lambda: peak("QLoRA", names[1], large, device, False, adapter="qlora", **block),
        ),
    ]
    start = time.monotonic()
    rows = []
    for label, run in parts:
        if time.monotonic() - start > TOTAL_BUDGET_S:
            rows.append(Row(label, "—", note="skipped: the 8-minute budget is spent"))
            continue
        rows.append(run())
        print(f"  {label}: {rows[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


VALIDATION_HEADER = "| case | term | estimated | measured | measured − estimated | allowed |"


def validation_table() -> str:
    """The CPU tensor-bytes validation (tests/trainer/test_memory_measured.py asserts it)."""
    rows = [
        [case, term, f"{est:,}", f"{got:,}", f"{got - est:+,}", f"0..{allowed:,}"]
        for case, term, est, got, allowed in probe.validation_rows()
    ]
    return markdown(VALIDATION_HEADER, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, under a minute")
    parser.add_argument("--validate", action="store_true", help="also the CPU validation table")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run on a GPU machine, or pass --dry-run")
    started = time.monotonic()
    rows = proof(args.dry_run)
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"GPU proof on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print(markdown(HEADER, [r.cells() for r in rows]))
    if args.dry_run or args.validate:
        print("\nCPU tensor bytes after one real step (bytes):\n")
        print(validation_table())
    print(f"\n{time.monotonic() - started:.0f} s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
