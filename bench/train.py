"""The trainer's own costs, from one run: kubetrain's trainer against a bare HF Trainer, the packed
dataset against what training eats, checkpoint writes and the stall of background uploads.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/train.py

The dataset is built by the real preprocess stage from Python's standard library
(tests/support/corpus.py); the model is a tiny Llama built from a config. Both trainers run in this
process, alternately (`--rounds` times each, swapping which goes first) on the same model, data,
batch, optimizer and schedule; a step's time is the interval between consecutive `on_step_end`s
(wall clock, and the training thread's CPU time, which other tenants of a shared host disturb less),
with intervals that contain a checkpoint or an evaluation left out. kubetrain's side includes
everything it adds to a step: its sampler and accounting collator, logging every step to the health
checks, the metrics registry, the sample ledger, the checkpoint hooks. The S3 part starts a local
`moto_server` and uploads the checkpoints to it in the background. Last, `make demo`'s run:
`kubetrain run examples/tinystories-cpu.yaml` from a cold cache (BPE training, preprocessing,
sanity gate, training, evaluation) with its output redirected into the scratch directory — its
wall time and the first and last logged training loss. Prints one table.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]  # the stand-in, test helpers
MODEL = {
    "hiddenSize": 128,
    "layers": 2,
    "heads": 4,
    "kvHeads": 2,
    "intermediateSize": 256,
    "contextLength": 128,
}
MICRO_BATCH = 8
WARMUP_STEPS = 10
#: Both trainers step the same optimizer: HF's default (fused AdamW) is not kubetrain's
#: (`training.optimizer` defaults to adamw_torch), and a different optimizer is not overhead.
OPTIMIZER = "adamw_torch"


def step_clock(busy: Any = None) -> Any:
    """A TrainerCallback timing optimizer steps (saves and evaluations excluded)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.steps: list[tuple[float, float, bool]] = []
            """(wall seconds, main-thread CPU seconds, an upload was running) per step."""
            self._last: tuple[float, float] | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = (time.perf_counter(), time.thread_time())
            if self._last is not None and state.global_step > WARMUP_STEPS:
                wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
                self.steps.append((wall, cpu, bool(busy and busy())))
            self._last = now

        def on_save(self, *args: Any, **kwargs: Any) -> None:
            self._last = None

        on_evaluate = on_save

        def median(self, uploading: bool | None = None, cpu: bool = False) -> float:
            chosen = [
                c if cpu else w for w, c, b in self.steps if uploading is None or b == uploading
            ]
            return statistics.median(chosen) if chosen else float("nan")

    return StepClock()


def run_kubetrain(pointer: str, out: Path, steps: int, **changes: Any) -> tuple[Any, Any]:
    """A train-stage session with a step clock; returns (session, clock) after training."""
    from kubetrain_trainer import train
    from trainer_support import train_config

    config = train_config(
        pointer,
        out,
        model={"architecture": MODEL},
        training={
            "maxSteps": steps,
            "microBatchSize": MICRO_BATCH,
            "loggingSteps": 10,
            "optimizer": OPTIMIZER,
        },
        **changes,
    )
    session = train.prepare(config, out / "work")
    uploader = session.saver.uploader
    clock = step_clock(busy=(lambda: bool(uploader.busy())) if uploader else None)
    session.trainer.add_callback(clock)
    session.train()
    return session, clock


def run_bare(pointer: str, out: Path, steps: int) -> Any:
    """A plain HF Trainer on the same model, rows, batch and schedule; returns its clock."""
    import torch
    from transformers import (
        PrinterCallback,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from kubetrain_trainer import data, model
    from kubetrain_trainer.config import AWS_S3, Architecture
    from stage_base import train_block

    dataset = data.open_dataset(pointer, out / "work", AWS_S3)
    blocks = dataset.split("train")
    assert blocks is not None

    class Rows(torch.utils.data.Dataset[dict[str, Any]]):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {k: v for k, v in blocks[i].items() if k != "row"}

    tokenizer = model.load_tokenizer(dataset.tokenizer_dir)
    set_seed(7)
    network = model.build_llama(
        Architecture.model_validate(train_block("model.architecture", MODEL)), tokenizer
    )
    args = TrainingArguments(
        output_dir=str(out / "bare"),
        max_steps=steps,
        per_device_train_batch_size=MICRO_BATCH,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        optim=OPTIMIZER,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
    )
    clock = step_clock()
    trainer = Trainer(
        model=network,
        args=args,
        train_dataset=Rows(),
        data_collator=default_data_collator,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # no printing: the leanest baseline
    trainer.train()
    return clock


def reader_batches_per_second(pointer: str, work: Path, batches: int) -> float:
    """How fast the memory-mapped dataset, the stream sampler and the collator deliver batches."""
    import torch

    from kubetrain_trainer import data
    from kubetrain_trainer.config import AWS_S3

    dataset = data.open_dataset(pointer, work, AWS_S3)
    blocks = dataset.split("train")
    assert blocks is not None
    sampler = data.StreamSampler(len(blocks), 7, 0, batches * MICRO_BATCH)
    loader = torch.utils.data.DataLoader(
        blocks, batch_size=MICRO_BATCH, sampler=sampler, collate_fn=dataset.collator()
    )
    started = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - started)


def moto_server(port: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto_server did not start")


DEMO = ROOT / "examples" / "tinystories-cpu.yaml"


def run_demo(work: Path) -> dict[str, Any]:
    """`make demo`'s `kubetrain run examples/tinystories-cpu.yaml`, output and dataset cache in
    `work` (a copy of the example with `output.uri` there, so the cache is cold and the repository
    untouched). Returns its wall time, exit code and the first and last logged training loss."""
    import json

    import yaml

    work.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    doc["spec"]["output"]["uri"] = str(work / "output")
    spec = work / DEMO.name
    spec.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    workdir = work / "run"
    command = [sys.executable, "-m", "kubetrain_operator.cli", "run", str(spec)]
    with (work / "kubetrain-run.log").open("w", encoding="utf-8") as log:
        started = time.perf_counter()
        code = subprocess.run(
            [*command, "--workdir", str(workdir)],
            cwd=ROOT,  # the example's data path is relative to the repository, as in `make demo`
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
        wall = time.perf_counter() - started
    # One JSON line per logging interval (docs/trainer.md), the numbers behind the
    # `step N/M loss X` lines of <workdir>/logs/train.log.
    train_log = workdir / "train-log.jsonl"
    lines = train_log.read_text(encoding="utf-8").splitlines() if train_log.exists() else []
    logged = [(e["step"], e["loss"]) for e in map(json.loads, lines) if "loss" in e]
    return {
        "wall": wall,
        "code": code,
        "first": logged[0] if logged else None,
        "last": logged[-1] if logged else None,
        "log": log.name,
    }


def histogram_mean(session: Any, name: str) -> float:
    registry = session.metrics.registry
    total = registry.get_sample_value(f"{name}_sum", {"run": "t"}) or 0.0
    count = registry.get_sample_value(f"{name}_count", {"run": "t"}) or 0.0
    return total / count if count else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating runs per trainer")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    parser.add_argument("--no-demo", action="store_true", help="skip the `make demo` run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.WARNING)
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from trainer_support import Assets

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    work = args.work or Path(tempfile.mkdtemp(prefix="kubetrain-bench-train-"))
    pointer = Assets(work / "assets").text()

    runners = {
        "bare": lambda i: run_bare(pointer, work / f"bare-{i}", args.steps),
        "kubetrain": lambda i: run_kubetrain(pointer, work / f"kt-{i}", args.steps)[1],
    }
    clocks: dict[str, list[Any]] = {"bare": [], "kubetrain": []}
    for i in range(args.rounds):  # swap which goes first, against drift in the host's load
        for name in ("bare", "kubetrain") if i % 2 == 0 else ("kubetrain", "bare"):
            clocks[name].append(runners[name](i))
    bare, ours = clocks["bare"], clocks["kubetrain"]
    bare_step = statistics.median(c.median() for c in bare)
    our_step = statistics.median(c.median() for c in ours)
    bare_cpu = statistics.median(c.median(cpu=True) for c in bare)
    our_cpu = statistics.median(c.median(cpu=True) for c in ours)

    delivered = reader_batches_per_second(pointer, work / "reader", 3000)
    consumed = 1 / our_step

    local, _ = run_kubetrain(
        pointer, work / "ckpt-local", args.steps, checkpoints={"everySteps": 20, "keep": 2}
    )
    write = histogram_mean(local, "kubetrain_checkpoint_save_duration_seconds")
    size = sum(
        p.stat().st_size
        for p in next((work / "ckpt-local" / "checkpoints").glob("step-*")).rglob("*")
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    server = moto_server(port)
    try:
        from kubetrain_trainer import storage
        from kubetrain_trainer.config import S3Settings

        s3 = {
            "endpoint": f"http://127.0.0.1:{port}",
            "region": "us-east-1",
            "allowInsecureEndpoint": True,  # the local moto_server
        }
        storage.client(S3Settings(**s3)).create_bucket(Bucket="bench")
        remote, clock = run_kubetrain(
            pointer,
            work / "ckpt-s3",
            args.steps,
            checkpoints={"everySteps": 20, "keep": 2},
            outputUri="s3://bench/run",
            s3=s3,
        )
        durable = histogram_mean(remote, "kubetrain_checkpoint_save_duration_seconds")
        quiet, uploading = clock.median(uploading=False), clock.median(uploading=True)
        overlapped = sum(1 for *_, busy in clock.steps if busy)
    finally:
        server.terminate()

    demo = None if args.no_demo else run_demo(work / "demo")

    table = Table(
        title=f"kubetrain trainer overheads — tiny Llama {MODEL['hiddenSize']}×"
        f"{MODEL['layers']}, batch {MICRO_BATCH}×64 tokens, CPU, 1 thread"
    )
    for column in ("measure", "kubetrain", "reference", "result", "target"):
        table.add_column(column)
    table.add_row(
        "median step time (wall)",
        f"{our_step * 1e3:.2f} ms",
        f"{bare_step * 1e3:.2f} ms (bare HF Trainer)",
        f"{our_step / bare_step - 1:+.1%}",
        "≤ +3%",
    )
    table.add_row(
        "median step CPU time (training thread)",
        f"{our_cpu * 1e3:.2f} ms",
        f"{bare_cpu * 1e3:.2f} ms (bare HF Trainer)",
        f"{our_cpu / bare_cpu - 1:+.1%}",
        "≤ +3%",
    )
    table.add_row(
        "batches/s: dataset delivers vs training consumes",
        f"{delivered:,.0f}/s",
        f"{consumed:,.1f}/s",
        f"{delivered / consumed:,.0f}×",
        "≥ 50×",
    )
    table.add_row(
        "checkpoint write (local, then COMPLETE + rename)",
        f"{write * 1e3:.0f} ms",
        f"{size / 1e6:.1f} MB per checkpoint",
        f"{write / our_step:.1f} steps of stall",
        "—",
    )
    table.add_row(
        "step time while an S3 upload runs in background",
        f"{uploading * 1e3:.2f} ms ({overlapped} steps)",
        f"{quiet * 1e3:.2f} ms (no upload)",
        f"{uploading / quiet - 1:+.1%}",
        "—",
    )
    table.add_row(
        "checkpoint durable in S3 (write + upload)",
        f"{durable * 1e3:.0f} ms",
        "moto_server on 127.0.0.1",
        "training never waited",
        "—",
    )
    if demo is not None:
        losses = "no training loss logged"
        if demo["first"] is not None:
            (first_step, first_loss), (last_step, last_loss) = demo["first"], demo["last"]
            losses = (
                f"loss {first_loss:.3f} (step {first_step}) → {last_loss:.3f} (step {last_step})"
            )
        table.add_row(
            "make demo: kubetrain run examples/tinystories-cpu.yaml",
            f"{demo['wall']:.0f} s wall"
            + (f" (failed: exit {demo['code']}, see {demo['log']})" if demo["code"] else ""),
            "cold cache: BPE, preprocess, sanity, train, eval",
            losses,
            "a few minutes, loss falling",
        )
    console = Console(width=150)
    console.print(table)
    console.print(
        f"[dim]{args.rounds} alternating rounds × {args.steps} steps per trainer, first "
        f"{WARMUP_STEPS} steps and save/eval intervals excluded; scratch: {work}[/dim]"
    )


if __name__ == "__main__":
    main()
