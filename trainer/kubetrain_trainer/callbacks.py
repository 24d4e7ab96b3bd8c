"""What kubetrain adds to the HF training loop, as single-purpose `TrainerCallback`s (as TRL does):
the step clock, the sample ledger, the Prometheus export, the training log, and health.

Trainer is told to log every step (cheap: one scalar gather), so these callbacks see every loss and
gradient norm: a NaN or an exploding gradient stops the run at the step it appears (exit 3), and the
sanity gate judges every step. Users still get one log line per `loggingSteps`. Counters that need
all ranks (tokens, samples, data wait, a pending stop signal) are summed with one small all-reduce
per optimizer step (`StepClock`, first in line); only rank 0 exports them (docs/metrics.md).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetrain_contract.durations import format_duration
from kubetrain_trainer.config import SanityGate
from kubetrain_trainer.data import BatchStats, StreamPosition
from kubetrain_trainer.metrics import TrainerMetrics
from kubetrain_trainer.stage import Unhealthy

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Dense 16-bit tensor-core peak FLOP/s per GPU from NVIDIA's datasheets (no sparsity), matched
#: against torch.cuda.get_device_name(); longer names first so "H100 PCIe" wins over "H100".
PEAK_FLOPS_16BIT = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
    "T4": 65e12,
}
#: Consecutive fp16 overflow steps tolerated: enough for the scaler to halve 2^16 down to 1.
FP16_OVERFLOW_STEPS = 20
#: Smoothing of tokens/s and the step time behind the ETA (weight of the newest step).
EMA_WEIGHT = 0.1


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's 16-bit peak, or None where unknown (CPUs, fp32, unlisted GPUs): no MFU then."""
    if precision not in ("bf16", "fp16"):
        return None
    return next((v for k, v in PEAK_FLOPS_16BIT.items() if k in device_name), None)


def flops_per_token(config: Any, seq_len: int, *, adapter: bool) -> float | None:
    """Training FLOPs per token, PaLM-style: 6N + 12·L·d·T (4N for adapters: no weight grads).

    N counts the matmul weights from the config (a 4-bit model's packed tensors would undercount).
    """
    try:
        d, layers = int(config.hidden_size), int(config.num_hidden_layers)
        ff, vocab, heads = (
            int(config.intermediate_size),
            int(config.vocab_size),
            config.num_attention_heads,
        )
        kv = int(getattr(config, "num_key_value_heads", None) or heads) * (d // int(heads))
    except (AttributeError, TypeError):
        return None
    n = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * vocab
    return (4 if adapter else 6) * n + 12 * layers * d * seq_len


@dataclass
class StepAccounting:
    """What this rank consumed since the last optimizer step; the trainer adds, callbacks read."""

    world_size: int
    device: torch.device
    rows: list[int] = field(default_factory=list)
    tokens: int = 0
    samples: int = 0
    data_wait: float = 0.0
    stop_requested: bool = False
    """Set by the SIGTERM handler; acted on by every rank at the same step (it is summed)."""
    stop_everywhere: bool = False

    def add_batch(self, stats: BatchStats) -> None:
        self.rows.extend(stats.rows)
        self.tokens += stats.tokens
        self.samples += len(stats.rows)

    def timed(self, iterator: Iterator[T]) -> Iterator[T]:
        """Yields from iterator, adding the time spent waiting for each item to data_wait."""
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.data_wait += time.perf_counter() - started
            yield item

    def reduce(self) -> tuple[int, int, float]:
        """(tokens, samples, data wait) summed over ranks; also decides `stop_everywhere`."""
        values = [
            float(self.tokens),
            float(self.samples),
            self.data_wait,
            float(self.stop_requested),
        ]
        if self.world_size > 1 and torch.distributed.is_initialized():
            tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(tensor)
            values = tensor.tolist()
        self.stop_everywhere = values[3] > 0
        self.tokens, self.samples, self.data_wait = 0, 0, 0.0
        return int(values[0]), int(values[1]), values[2]


@dataclass(frozen=True)
class MemoryPeaks:
    """The peak memory of a process — after `max_over_ranks`, of the busiest rank — measured
    beside the memory model's estimate (docs/fit.md): the GPU's allocated and reserved peaks
    (CUDA only), the process's peak resident set size, and the GPU's total memory."""

    allocated: int | None
    reserved: int | None
    rss: int
    device: int | None

    @classmethod
    def measure(cls, device: torch.device) -> MemoryPeaks:
        """This process, since it started (the load of the weights included)."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        if device.type != "cuda":
            return cls(allocated=None, reserved=None, rss=rss, device=None)
        return cls(
            allocated=torch.cuda.max_memory_allocated(device),
            reserved=torch.cuda.max_memory_reserved(device),
            rss=rss,
            device=torch.cuda.get_device_properties(device).total_memory,
        )

    def max_over_ranks(self, device: torch.device, world_size: int) -> MemoryPeaks:
        """Each figure's maximum over the ranks: a collective, which every rank must take."""
        if world_size <= 1 or not torch.distributed.is_initialized():
            return self
        figures = (self.allocated, self.reserved, self.rss, self.device)
        tensor = torch.tensor([-1 if v is None else v for v in figures], device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        allocated, reserved, rss, total = (None if v < 0 else int(v) for v in tensor.tolist())
        assert rss is not None
        return MemoryPeaks(allocated=allocated, reserved=reserved, rss=rss, device=total)

    def result(self, estimate: int | None) -> dict[str, int | None]:
        """The train/sanity result's flat keys (they survive the termination-message trim)."""
        return {
            "memoryPeakAllocatedBytes": self.allocated,
            "memoryPeakReservedBytes": self.reserved,
            "memoryPeakRssBytes": self.rss,
            "deviceMemoryBytes": self.device,
            "memoryEstimateBytes": estimate,
        }


class StepClock(TrainerCallback):
    """Every rank, first in line: the per-step all-reduce of the accounting (which also decides a
    pending stop, see `checkpoint.SignalStop`), the step's duration and the smoothed step time
    and tokens/s behind the ETA. The callbacks after it read `last` and the smoothed values."""

    def __init__(self, *, accounting: StepAccounting, rows: int, position: StreamPosition) -> None:
        self.accounting, self.rows, self.position = accounting, rows, position
        self.last = (0, 0, 0.0, 0.0)
        """(tokens, samples, data wait, duration) of the step just ended, all ranks summed."""
        self.step_time: float | None = None
        self.tokens_per_second: float | None = None
        self._last_step_end = time.perf_counter()

    def epoch_at(self, step: int) -> float:
        return self.position.at(step) / self.rows

    def eta(self, state: TrainerState) -> float:
        return max(state.max_steps - state.global_step, 0) * (self.step_time or 0.0)

    def restart(self) -> None:
        """Time spent outside steps (evaluation, saving) is not step time."""
        self._last_step_end = time.perf_counter()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.restart()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tokens, samples, wait = self.accounting.reduce()
        now = time.perf_counter()
        duration, self._last_step_end = now - self._last_step_end, now
        self.last = (tokens, samples, wait, duration)
        self.step_time = _ema(self.step_time, duration)
        self.tokens_per_second = _ema(self.tokens_per_second, tokens / max(duration, 1e-9))
        state.epoch = self.epoch_at(state.global_step)  # the stream's epoch, not HF's loop count

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.restart()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.restart()  # the save is accounted separately


class SampleLedgerCallback(TrainerCallback):
    """`<stage>-samples/rank-NNNNN.jsonl`: the rows every optimizer step consumed on this rank, so
    a loss spike can be traced to its batch and exact resume can be proven. Appended to across
    restarts (a replayed step's last line counts); buffered, flushed at every logging interval and
    every save (before CheckpointCallback, added later, commits it) — not one write per step."""

    def __init__(
        self, *, accounting: StepAccounting, workdir: Path, stage: str, rank: int, every: int
    ) -> None:
        self.accounting, self.every = accounting, every
        (workdir / f"{stage}-samples").mkdir(parents=True, exist_ok=True)
        self._ledger: IO[str] = (workdir / f"{stage}-samples" / f"rank-{rank:05d}.jsonl").open(
            "a", encoding="utf-8"
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ledger.write(
            json.dumps({"step": state.global_step, "rows": self.accounting.rows}) + "\n"
        )
        self.accounting.rows = []

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._ledger.flush()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._ledger.flush()

    def close(self) -> None:
        self._ledger.close()


class PrometheusCallback(TrainerCallback):
    """Rank 0: the trainer's Prometheus series (docs/metrics.md) from the clock and the logs."""

    def __init__(
        self,
        *,
        metrics: TrainerMetrics,
        clock: StepClock,
        rank: int,
        world_size: int,
        flops_per_token: float | None,
        peak_flops: float | None,
    ) -> None:
        self.metrics, self.clock, self.rank, self.world_size = metrics, clock, rank, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._cuda = torch.cuda.is_available()
        self._device = torch.device("cpu")
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        for series in (  # counters and histograms exist from the start, at zero
            metrics.tokens,
            metrics.samples,
            metrics.nonfinite_loss,
            metrics.dataloader_wait,
            metrics.step_duration,
            metrics.checkpoint_saves,
            metrics.checkpoint_save_duration,
            metrics.checkpoint_upload_failures,
        ):
            self._labels(series)

    def _labels(self, series: Any, **extra: str) -> Any:
        """The series' child for this run, created on first use (labels() costs microseconds)."""
        key = (id(series), tuple(extra.values()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = series.labels(run=self.metrics.run, **extra)
        return child

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        m = self.metrics
        self._labels(m.total_steps).set(state.max_steps)
        self._labels(m.step).set(state.global_step)
        self._labels(m.epoch).set(self.clock.epoch_at(state.global_step))
        self._device = args.device
        self.export_memory()

    def export_memory(self) -> None:
        """Rank 0's peaks so far and the GPU's total (the all-rank maximum is in the result)."""
        peaks = MemoryPeaks.measure(self._device)
        for kind, value in (
            ("allocated", peaks.allocated),
            ("reserved", peaks.reserved),
            ("rss", peaks.rss),
        ):
            if value is not None:
                self._labels(self.metrics.memory_peak, kind=kind).set(value)
        if peaks.device is not None:
            self._labels(self.metrics.device_memory).set(peaks.device)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        m, clock = self.metrics, self.clock
        tokens, samples, wait, duration = clock.last
        self._labels(m.step).set(state.global_step)
        self._labels(m.epoch).set(state.epoch)
        self._labels(m.tokens).inc(tokens)
        self._labels(m.samples).inc(samples)
        self._labels(m.dataloader_wait).inc(wait)
        self._labels(m.step_duration).observe(duration)
        self._labels(m.last_step_timestamp).set(time.time())
        self._labels(m.tokens_per_second).set(clock.tokens_per_second)
        self._labels(m.eta).set(clock.eta(state))
        if self.flops_per_token and self.peak_flops and clock.tokens_per_second:
            per_device = clock.tokens_per_second / max(self.world_size, 1)
            self._labels(m.mfu).set(per_device * self.flops_per_token / self.peak_flops)
        if self._cuda:
            self._labels(m.gpu_memory_allocated, rank=str(self.rank)).set(
                torch.cuda.memory_allocated()
            )
            self._labels(m.gpu_memory_peak, rank=str(self.rank)).set(
                torch.cuda.max_memory_allocated()
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        m = self.metrics
        if logs.get("grad_norm") is not None:
            self._labels(m.grad_norm).set(logs["grad_norm"])
        self._labels(m.learning_rate).set(logs.get("learning_rate", 0.0))

    def on_interval(self, mean: dict[str, float]) -> None:
        """A logging interval closed (called by TrainLogCallback with its window means)."""
        self._labels(self.metrics.loss).set(mean["loss"])
        self.export_memory()
        if "rewards/accuracies" in mean:
            self._labels(self.metrics.dpo_reward_accuracy).set(mean["rewards/accuracies"])
            self._labels(self.metrics.dpo_reward_margin).set(mean["rewards/margins"])

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self._labels(self.metrics.eval_loss).set(metrics["eval_loss"])


#: What transformers warns when an epoch yields no batch: a resumed stage with no step left.
EMPTY_EPOCH_WARNING = "There seems not to be a single sample in your epoch_iterator"


class _DropEmptyEpoch(logging.Filter):
    """Drops transformers' empty-epoch warning while a complete stage passes through Trainer: it
    is expected there, and worded as if something were wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(EMPTY_EPOCH_WARNING)


class TrainLogCallback(TrainerCallback):
    """Every step's losses averaged over `loggingSteps`: one log line and one JSON line in
    `<stage>-log.jsonl` (rank 0, in the workdir) per interval and evaluation, the interval's
    numbers in Trainer's log history (intermediate entries dropped); for the result, the run's
    first and last interval loss (across resumes: the history is restored with the checkpoint)
    and the tokens/s at the end. A stage resumed at its last step says it is complete."""

    def __init__(
        self,
        *,
        clock: StepClock,
        workdir: Path,
        stage: str,
        rank: int,
        logging_steps: int,
        prometheus: PrometheusCallback | None,
    ) -> None:
        self.clock, self.logging_steps, self.prometheus = clock, logging_steps, prometheus
        self._log: IO[str] | None = (
            (workdir / f"{stage}-log.jsonl").open("a", encoding="utf-8", buffering=1)
            if rank == 0
            else None
        )
        self._window: dict[str, list[float]] = {}
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.tokens_per_second: float | None = None
        self._quiet = _DropEmptyEpoch()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        if losses:
            self.first_loss, self.last_loss = losses[0], losses[-1]
        if state.max_steps and state.global_step >= state.max_steps:
            log.info("stage complete at step %d: nothing left to train", state.global_step)
            logging.getLogger("transformers.trainer").addFilter(self._quiet)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        logging.getLogger("transformers.trainer").removeFilter(self._quiet)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        for key, value in logs.items():
            self._window.setdefault(key, []).append(value)
        if state.global_step % self.logging_steps and state.global_step < state.max_steps:
            # Trainer appended this step's entry to state.log_history (saved in every
            # checkpoint's trainer_state.json): keep only the intervals users see, or the history
            # grows by one entry per step for the whole run.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history.pop()
            return
        window, self._window = self._window, {}
        mean = {key: _mean(values) for key, values in window.items()}
        if self.first_loss is None:
            self.first_loss = mean["loss"]
        self.last_loss = mean["loss"]
        self.tokens_per_second = self.clock.tokens_per_second
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            logged = state.log_history[-1]  # the interval's numbers, as Trainer's own logging has
            logged["loss"] = mean["loss"]
            if "grad_norm" in window:
                logged["grad_norm"] = max(window["grad_norm"])
        if self.prometheus is not None:
            self.prometheus.on_interval(mean)
        if self._log is None:
            return
        entry = {
            "step": state.global_step,
            "totalSteps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 6),
            "loss": mean["loss"],
            "gradNorm": max(window.get("grad_norm", [math.nan])),
            "learningRate": logs.get("learning_rate"),
            "tokensPerSecond": self.clock.tokens_per_second,
            "etaSeconds": self.clock.eta(state),
            "time": time.time(),
        }
        if "rewards/accuracies" in mean:
            entry.update(
                rewardAccuracy=mean["rewards/accuracies"], rewardMargin=mean["rewards/margins"]
            )
        self._log.write(json.dumps(entry, allow_nan=True) + "\n")
        log.info(
            "step %d/%d loss %.4f grad norm %.3g lr %.3g %.0f tok/s eta %s",
            state.global_step,
            state.max_steps,
            mean["loss"],
            entry["gradNorm"],
            entry["learningRate"] or 0.0,
            self.clock.tokens_per_second or 0.0,
            format_duration(self.clock.eta(state)),
        )

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not metrics or "eval_loss" not in metrics or self._log is None:
            return
        self._log.write(
            json.dumps({"step": state.global_step, "evalLoss": metrics["eval_loss"]}) + "\n"
        )
        log.info("step %d eval loss %.4f", state.global_step, metrics["eval_loss"])

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


class HealthCallback(TrainerCallback):
    """Stops an unhealthy run at the step it turns bad, and judges the sanity gate.

    Every rank sees the same (gathered) loss and the same global gradient norm, so every rank
    raises at the same step and none is left waiting in a collective. In fp16 an infinite
    gradient norm is the loss scaler probing its scale (that step is skipped, the scale halves);
    only a run of FP16_OVERFLOW_STEPS of them in a row is fatal.
    """

    def __init__(
        self,
        *,
        max_grad_norm_abort: float,
        gate: SanityGate | None,
        window: int,
        metrics: TrainerMetrics | None,
        fp16: bool,
    ) -> None:
        self.abort, self.gate, self.window, self.metrics = (
            max_grad_norm_abort,
            gate,
            window,
            metrics,
        )
        self.overflows_allowed = FP16_OVERFLOW_STEPS if fp16 else 0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self._first_step: int | None = None
        self._overflows = 0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        step, loss, norm = state.global_step, logs["loss"], logs.get("grad_norm")
        if self._first_step is None:
            self._first_step = step
        if not math.isfinite(loss):
            if self.metrics is not None:
                self.metrics.nonfinite_loss.labels(run=self.metrics.run).inc()
            raise Unhealthy(
                f"training loss is {loss} at step {step} — lower training.learningRate, use bf16 "
                "instead of fp16, or check the data",
                {"step": step, "reason": "NonFiniteLoss"},
            )
        self.losses.append(loss)
        if norm is None:
            return
        self._overflows = 0 if math.isfinite(norm) else self._overflows + 1
        if 0 < self._overflows <= self.overflows_allowed:
            return
        self.grad_norms.append(norm)
        if not math.isfinite(norm) or norm > self.abort:
            raise Unhealthy(
                f"gradient norm {norm:.4g} at step {step} exceeds training.maxGradNormAbort "
                f"{self.abort:.4g}: the run is diverging — lower the learning rate",
                {"step": step, "reason": "GradientExplosion", "gradNorm": norm},
            )
        if step == self._first_step and norm == 0.0:
            raise Unhealthy(
                f"no gradient reached the trainable weights at step {step} (norm 0): nothing "
                "would train — a forward pass under torch.no_grad before training detaches "
                "4-bit LoRA weights, check the adapter's targetModules",
                {"step": step, "reason": "NoGradient"},
            )
        if self.gate is not None and norm > self.gate.max_grad_norm:
            raise Unhealthy(
                f"sanity gate failed: gradient norm {norm:.4g} at step {step} exceeds "
                f"sanity.maxGradNorm {self.gate.max_grad_norm:.4g}",
                {"sanity": self.gate_report(), "reason": "SanityGradNorm"},
            )

    def gate_report(self) -> dict[str, Any]:
        """First and last window means of the loss, its relative drop, and the largest gradient."""
        window = max(1, min(self.window, len(self.losses) // 2))
        first = _mean(self.losses[:window]) if self.losses else math.nan
        last = _mean(self.losses[-window:]) if self.losses else math.nan
        drop = (first - last) / first if first > 0 else math.nan
        return {
            "firstLoss": first,
            "lastLoss": last,
            "lossDrop": drop,
            "maxGradNorm": max(self.grad_norms, default=math.nan),
            "steps": len(self.losses),
        }

    def judge_gate(self) -> dict[str, Any]:
        """The gate's numbers if it passed; raises Unhealthy (exit 3) with them if not."""
        assert self.gate is not None
        report = self.gate_report()
        report.update(
            minLossDrop=self.gate.min_loss_drop, maxGradNormAllowed=self.gate.max_grad_norm
        )
        if not report["lossDrop"] >= self.gate.min_loss_drop:
            raise Unhealthy(
                f"sanity gate failed: loss {report['firstLoss']:.4f} → {report['lastLoss']:.4f} "
                f"in {report['steps']} steps is a {report['lossDrop']:.1%} drop, "
                f"sanity.minLossDrop asks for {self.gate.min_loss_drop:.1%}",
                {"sanity": report, "reason": "SanityLossFlat"},
            )
        return report


def _ema(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - EMA_WEIGHT) * previous + EMA_WEIGHT * value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
