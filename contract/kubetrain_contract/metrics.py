"""The data plane's Prometheus series, by the name they are scraped under (docs/metrics.md).

The trainer registers them; the operator reads the training ones into status.progress and
`kubetrain run` reads them into its progress bars; dashboards and alerts query them. A rename on
one side would silently blank the other, so every name is written here once. Counters carry the
`_total` they are exposed with (prometheus_client strips it from the family name and adds it back
to the sample).
"""

from typing import Final

# ------------------------------------------------------------------------------- preprocess stage
PREPROCESS_ROWS: Final = "kubetrain_preprocess_rows_total"
PREPROCESS_READ_BYTES: Final = "kubetrain_preprocess_read_bytes_total"
PREPROCESS_INPUT_BYTES: Final = "kubetrain_preprocess_input_bytes"
PREPROCESS_TOKENS: Final = "kubetrain_preprocess_tokens_total"
PREPROCESS_BLOCKS: Final = "kubetrain_preprocess_blocks_total"
PREPROCESS_CACHE_HITS: Final = "kubetrain_preprocess_cache_hits_total"
PREPROCESS_LAST_PROGRESS_TIMESTAMP: Final = "kubetrain_preprocess_last_progress_timestamp_seconds"
#: Per data source (`source` is the source's name, at most 64 per run): outcome is read,
#: accepted, rejected or selected.
PREPROCESS_SOURCE_ROWS: Final = "kubetrain_preprocess_source_rows_total"
PREPROCESS_SOURCE_TOKENS: Final = "kubetrain_preprocess_source_tokens_total"
#: Per data source and rejection reason (the reasons of docs/preprocessing.md: a few).
PREPROCESS_SOURCE_REJECTED: Final = "kubetrain_preprocess_source_rejected_rows_total"
#: Per data source: files read and files its exclude globs left out (state read | excluded).
PREPROCESS_SOURCE_FILES: Final = "kubetrain_preprocess_source_files"

# ------------------------------------------------------------------------- train and sanity stages
TRAIN_STEP: Final = "kubetrain_train_step"
TRAIN_TOTAL_STEPS: Final = "kubetrain_train_total_steps"
TRAIN_EPOCH: Final = "kubetrain_train_epoch"
TRAIN_LOSS: Final = "kubetrain_train_loss"
EVAL_LOSS: Final = "kubetrain_eval_loss"
TRAIN_LEARNING_RATE: Final = "kubetrain_train_learning_rate"
TRAIN_GRAD_NORM: Final = "kubetrain_train_grad_norm"
TRAIN_TOKENS: Final = "kubetrain_train_tokens_total"
TRAIN_SAMPLES: Final = "kubetrain_train_samples_total"
TRAIN_STEP_DURATION: Final = "kubetrain_train_step_duration_seconds"
TRAIN_TOKENS_PER_SECOND: Final = "kubetrain_train_tokens_per_second"
TRAIN_MFU: Final = "kubetrain_train_mfu_ratio"
TRAIN_LAST_STEP_TIMESTAMP: Final = "kubetrain_train_last_step_timestamp_seconds"
TRAIN_ETA: Final = "kubetrain_train_eta_seconds"
TRAIN_NONFINITE_LOSS: Final = "kubetrain_train_nonfinite_loss_total"
TRAIN_DATALOADER_WAIT: Final = "kubetrain_train_dataloader_wait_seconds_total"
GPU_MEMORY_ALLOCATED: Final = "kubetrain_gpu_memory_allocated_bytes"
GPU_MEMORY_PEAK: Final = "kubetrain_gpu_memory_peak_bytes"
TRAIN_MEMORY_PEAK: Final = "kubetrain_train_memory_peak_bytes"
TRAIN_MEMORY_ESTIMATE: Final = "kubetrain_train_memory_estimate_bytes"
TRAIN_DEVICE_MEMORY: Final = "kubetrain_train_device_memory_bytes"
#: The `kind` label of TRAIN_MEMORY_PEAK: torch.cuda's max allocated and max reserved bytes of the
#: GPU (CUDA only), and the process's peak resident set size (every process).
MEMORY_PEAK_KINDS: Final = ("allocated", "reserved", "rss")
CHECKPOINT_SAVES: Final = "kubetrain_checkpoint_saves_total"
CHECKPOINT_LAST_STEP: Final = "kubetrain_checkpoint_last_step"
CHECKPOINT_LAST_TIMESTAMP: Final = "kubetrain_checkpoint_last_timestamp_seconds"
CHECKPOINT_SAVE_DURATION: Final = "kubetrain_checkpoint_save_duration_seconds"
CHECKPOINT_UPLOAD_FAILURES: Final = "kubetrain_checkpoint_upload_failures_total"
DPO_REWARD_MARGIN: Final = "kubetrain_dpo_reward_margin"
DPO_REWARD_ACCURACY: Final = "kubetrain_dpo_reward_accuracy_ratio"

PROGRESS: Final = (
    TRAIN_STEP,
    TRAIN_TOTAL_STEPS,
    TRAIN_LOSS,
    TRAIN_TOKENS_PER_SECOND,
    TRAIN_ETA,
    TRAIN_LAST_STEP_TIMESTAMP,
    TRAIN_MEMORY_PEAK,
    TRAIN_MEMORY_ESTIMATE,
    TRAIN_DEVICE_MEMORY,
    CHECKPOINT_LAST_STEP,
    PREPROCESS_LAST_PROGRESS_TIMESTAMP,
)
"""What the operator scrapes: into status.progress and status.checkpoint (training's), and the
preprocess heartbeat its stall check reads (a run's metrics Service is read for these and
nothing else)."""


def memory_peak_key(kind: str) -> str:
    """The key a scrape gives one `kind` of TRAIN_MEMORY_PEAK (one name, three series)."""
    return f"{TRAIN_MEMORY_PEAK}:{kind}"


ALL: Final = (
    PREPROCESS_ROWS,
    PREPROCESS_READ_BYTES,
    PREPROCESS_INPUT_BYTES,
    PREPROCESS_TOKENS,
    PREPROCESS_BLOCKS,
    PREPROCESS_CACHE_HITS,
    PREPROCESS_LAST_PROGRESS_TIMESTAMP,
    PREPROCESS_SOURCE_ROWS,
    PREPROCESS_SOURCE_TOKENS,
    PREPROCESS_SOURCE_REJECTED,
    PREPROCESS_SOURCE_FILES,
    TRAIN_STEP,
    TRAIN_TOTAL_STEPS,
    TRAIN_EPOCH,
    TRAIN_LOSS,
    EVAL_LOSS,
    TRAIN_LEARNING_RATE,
    TRAIN_GRAD_NORM,
    TRAIN_TOKENS,
    TRAIN_SAMPLES,
    TRAIN_STEP_DURATION,
    TRAIN_TOKENS_PER_SECOND,
    TRAIN_MFU,
    TRAIN_LAST_STEP_TIMESTAMP,
    TRAIN_ETA,
    TRAIN_NONFINITE_LOSS,
    TRAIN_DATALOADER_WAIT,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_PEAK,
    TRAIN_MEMORY_PEAK,
    TRAIN_MEMORY_ESTIMATE,
    TRAIN_DEVICE_MEMORY,
    CHECKPOINT_SAVES,
    CHECKPOINT_LAST_STEP,
    CHECKPOINT_LAST_TIMESTAMP,
    CHECKPOINT_SAVE_DURATION,
    CHECKPOINT_UPLOAD_FAILURES,
    DPO_REWARD_MARGIN,
    DPO_REWARD_ACCURACY,
)
"""Every series of the data plane: the trainer registers exactly these."""
