"""Prometheus metrics of the data plane (names and units: docs/metrics.md, the contract).

One registry per process, injected (tests read it with `get_sample_value`); only rank 0 serves it,
because per-rank registries would need the multiprocess mode and its shared files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
            "kubetrain_preprocess_rows",
            "Input rows by result (accepted/rejected) and reject reason",
            ["run", "result", "reason"],
            registry=r,
        )
        self.read_bytes = Counter(
            "kubetrain_preprocess_read_bytes", "Input bytes read (as stored)", labels, registry=r
        )
        self.input_bytes = Gauge(
            "kubetrain_preprocess_input_bytes",
            "Input bytes to read in all (as stored): the denominator of progress",
            labels,
            registry=r,
        )
        self.tokens = Counter("kubetrain_preprocess_tokens", "Tokens produced", labels, registry=r)
        self.blocks = Counter(
            "kubetrain_preprocess_blocks", "Packed blocks written", labels, registry=r
        )
        self.cache_hits = Counter(
            "kubetrain_preprocess_cache_hits",
            "Complete datasets reused from the cache",
            labels,
            registry=r,
        )


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

        self.step = gauge("kubetrain_train_step", "Optimizer steps done (global)")
        self.total_steps = gauge("kubetrain_train_total_steps", "Planned optimizer steps")
        self.epoch = gauge("kubetrain_train_epoch", "Fractional epoch")
        self.loss = gauge("kubetrain_train_loss", "Last logged training loss")
        self.eval_loss = gauge("kubetrain_eval_loss", "Last validation loss")
        self.learning_rate = gauge("kubetrain_train_learning_rate", "Current learning rate")
        self.grad_norm = gauge("kubetrain_train_grad_norm", "Last gradient norm before clipping")
        self.tokens = counter("kubetrain_train_tokens", "Non-padding tokens consumed, all ranks")
        self.samples = counter("kubetrain_train_samples", "Sequences consumed, all ranks")
        self.step_duration = Histogram(
            "kubetrain_train_step_duration_seconds",
            "Wall time per optimizer step",
            labels,
            registry=r,
            buckets=STEP_BUCKETS,
        )
        self.tokens_per_second = gauge(
            "kubetrain_train_tokens_per_second", "Smoothed throughput, all ranks"
        )
        self.mfu = gauge("kubetrain_train_mfu_ratio", "Model FLOPs utilisation (0-1)")
        self.last_step_timestamp = gauge(
            "kubetrain_train_last_step_timestamp_seconds", "Unix time of the last completed step"
        )
        self.eta = gauge("kubetrain_train_eta_seconds", "Estimated time to the last step")
        self.nonfinite_loss = counter("kubetrain_train_nonfinite_loss", "NaN/Inf losses seen")
        self.dataloader_wait = counter(
            "kubetrain_train_dataloader_wait_seconds", "Time the step loop waited for data"
        )
        self.gpu_memory_allocated = gauge(
            "kubetrain_gpu_memory_allocated_bytes", "GPU memory allocated", ("rank",)
        )
        self.gpu_memory_peak = gauge(
            "kubetrain_gpu_memory_peak_bytes", "Peak GPU memory", ("rank",)
        )
        self.checkpoint_saves = counter(
            "kubetrain_checkpoint_saves", "Complete checkpoints written"
        )
        self.checkpoint_last_step = gauge(
            "kubetrain_checkpoint_last_step", "Step of the newest complete checkpoint"
        )
        self.checkpoint_last_timestamp = gauge(
            "kubetrain_checkpoint_last_timestamp_seconds", "When the newest checkpoint completed"
        )
        self.checkpoint_save_duration = Histogram(
            "kubetrain_checkpoint_save_duration_seconds",
            "Time to write (and upload) a checkpoint",
            labels,
            registry=r,
            buckets=SAVE_BUCKETS,
        )
        self.checkpoint_upload_failures = counter(
            "kubetrain_checkpoint_upload_failures", "Failed uploads to the output store"
        )
        self.dpo_reward_margin = gauge(
            "kubetrain_dpo_reward_margin", "DPO chosen-rejected reward margin"
        )
        self.dpo_reward_accuracy = gauge(
            "kubetrain_dpo_reward_accuracy_ratio", "DPO reward accuracy (0-1)"
        )
