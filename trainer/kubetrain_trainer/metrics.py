"""Prometheus metrics of the data plane (names: kubetrain_contract.metrics; units: docs/metrics.md).

One registry per process, injected (tests read it with `get_sample_value`); only rank 0 serves it,
because per-rank registries would need the multiprocess mode and its shared files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetrain_contract import metrics as names

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SAVE_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800)


def serve(registry: CollectorRegistry, port: int) -> None:
    """Serve /metrics on 0.0.0.0:port in a daemon thread; port 0 disables the endpoint."""
    if port:
        start_http_server(port, registry=registry)


@dataclass
class PreprocessMetrics:
    """Series of the preprocess stage; every one carries `run`."""

    run: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, labels = self.registry, ["run"]
        self.rows = Counter(
            names.PREPROCESS_ROWS,
            "Input rows by result (accepted/rejected) and reject reason",
            ["run", "result", "reason"],
            registry=r,
        )
        self.read_bytes = Counter(
            names.PREPROCESS_READ_BYTES, "Input bytes read (as stored)", labels, registry=r
        )
        self.input_bytes = Gauge(
            names.PREPROCESS_INPUT_BYTES,
            "Input bytes to read in all (as stored): the denominator of progress",
            labels,
            registry=r,
        )
        self.tokens = Counter(names.PREPROCESS_TOKENS, "Tokens produced", labels, registry=r)
        self.blocks = Counter(names.PREPROCESS_BLOCKS, "Packed blocks written", labels, registry=r)
        self.cache_hits = Counter(
            names.PREPROCESS_CACHE_HITS,
            "Complete datasets reused from the cache",
            labels,
            registry=r,
        )
        self.source_rows = Counter(
            names.PREPROCESS_SOURCE_ROWS,
            "Rows per data source by outcome (read, accepted, rejected, selected)",
            ["run", "source", "outcome"],
            registry=r,
        )
        self.source_tokens = Counter(
            names.PREPROCESS_SOURCE_TOKENS,
            "Tokens of each data source's selected rows",
            ["run", "source"],
            registry=r,
        )
        self.source_rejected = Counter(
            names.PREPROCESS_SOURCE_REJECTED,
            "Rows rejected per data source, by reason",
            ["run", "source", "reason"],
            registry=r,
        )
        self.source_files = Gauge(
            names.PREPROCESS_SOURCE_FILES,
            "Files of each data source: read, and excluded by its exclude globs",
            ["run", "source", "state"],
            registry=r,
        )
        self.last_progress = Gauge(
            names.PREPROCESS_LAST_PROGRESS_TIMESTAMP,
            "Unix time of the last input chunk read or encoded (the operator's stall check)",
            labels,
            registry=r,
        )

    def beat(self) -> None:
        """Progress was made now: the heartbeat the operator compares with spec.stallTimeout."""
        self.last_progress.labels(self.run).set(time.time())


@dataclass
class TrainerMetrics:
    """Series of the train and sanity stages (rank 0); every one carries `run`."""

    run: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, labels = self.registry, ["run"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*labels, *extra], registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self.step = gauge(names.TRAIN_STEP, "Optimizer steps done (global)")
        self.total_steps = gauge(names.TRAIN_TOTAL_STEPS, "Planned optimizer steps")
        self.epoch = gauge(names.TRAIN_EPOCH, "Fractional epoch")
        self.loss = gauge(names.TRAIN_LOSS, "Last logged training loss")
        self.eval_loss = gauge(names.EVAL_LOSS, "Last validation loss")
        self.learning_rate = gauge(names.TRAIN_LEARNING_RATE, "Current learning rate")
        self.grad_norm = gauge(names.TRAIN_GRAD_NORM, "Last gradient norm before clipping")
        self.tokens = counter(names.TRAIN_TOKENS, "Non-padding tokens consumed, all ranks")
        self.samples = counter(names.TRAIN_SAMPLES, "Sequences consumed, all ranks")
        self.step_duration = Histogram(
            names.TRAIN_STEP_DURATION,
            "Wall time per optimizer step",
            labels,
            registry=r,
            buckets=STEP_BUCKETS,
        )
        self.tokens_per_second = gauge(
            names.TRAIN_TOKENS_PER_SECOND, "Smoothed throughput, all ranks"
        )
        self.mfu = gauge(names.TRAIN_MFU, "Model FLOPs utilisation (0-1)")
        self.last_step_timestamp = gauge(
            names.TRAIN_LAST_STEP_TIMESTAMP, "Unix time of the last completed step"
        )
        self.eta = gauge(names.TRAIN_ETA, "Estimated time to the last step")
        self.nonfinite_loss = counter(names.TRAIN_NONFINITE_LOSS, "NaN/Inf losses seen")
        self.dataloader_wait = counter(
            names.TRAIN_DATALOADER_WAIT, "Time the step loop waited for data"
        )
        self.gpu_memory_allocated = gauge(
            names.GPU_MEMORY_ALLOCATED, "GPU memory allocated", ("rank",)
        )
        self.gpu_memory_peak = gauge(names.GPU_MEMORY_PEAK, "Peak GPU memory", ("rank",))
        self.memory_peak = gauge(
            names.TRAIN_MEMORY_PEAK,
            "Peak memory of rank 0's process so far: GPU allocated and reserved (CUDA), RSS",
            ("kind",),
        )
        self.memory_estimate = gauge(
            names.TRAIN_MEMORY_ESTIMATE, "The memory model's estimate per process (docs/fit.md)"
        )
        self.device_memory = gauge(names.TRAIN_DEVICE_MEMORY, "Total memory of the GPU")
        self.checkpoint_saves = counter(names.CHECKPOINT_SAVES, "Complete checkpoints written")
        self.checkpoint_last_step = gauge(
            names.CHECKPOINT_LAST_STEP, "Step of the newest complete checkpoint"
        )
        self.checkpoint_last_timestamp = gauge(
            names.CHECKPOINT_LAST_TIMESTAMP, "When the newest checkpoint completed"
        )
        self.checkpoint_save_duration = Histogram(
            names.CHECKPOINT_SAVE_DURATION,
            "Time to write (and upload) a checkpoint",
            labels,
            registry=r,
            buckets=SAVE_BUCKETS,
        )
        self.checkpoint_upload_failures = counter(
            names.CHECKPOINT_UPLOAD_FAILURES, "Failed uploads to the output store"
        )
        self.dpo_reward_margin = gauge(names.DPO_REWARD_MARGIN, "DPO chosen-rejected reward margin")
        self.dpo_reward_accuracy = gauge(names.DPO_REWARD_ACCURACY, "DPO reward accuracy (0-1)")
