"""The TrainingRun's status as a typed model: what the operator writes, field by field.

`crd.py` generates the CRD's status schema from it, so `kubectl explain trainingrun.status.…`
documents every field, and the API server prunes (or, under strict field validation, refuses) a
field that is not declared here. The lifecycle that fills it in is `status.py`; its tests validate
every status it derives against the generated schema (tests/support/status_world.py), so a field
written there and missing here fails them. Descriptions are the field docstrings, as in api.py.
Every field is typed: nothing in the status is free-form.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from pydantic.alias_generators import to_camel

#: Rows of status.fit: every stage of a run (8 sanity rungs, train, merge) with room to spare.
FIT_ROWS = 16
#: Entries of status.dataset.sources: the API allows at most 64 sources per run.
SOURCE_ROWS = 64


class _Status(BaseModel):
    """camelCase like the spec; descriptions from docstrings, as in api.py."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True
    )


class Condition(_Status):
    """A kstatus condition, shaped like metav1.Condition (all but observedGeneration required)."""

    type: str = Field(
        max_length=316, pattern=r"^([a-z0-9.\-]+/)?[A-Za-z]([A-Za-z0-9_.\-]*[A-Za-z0-9])?$"
    )
    """Ready, Reconciling, Stalled, DataReady, SanityPassed or Succeeded."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown (Unknown on the operator's first visit)."""
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    """CamelCase reason, e.g. Training, CacheHit, InvalidSpec."""
    message: str = Field(max_length=32768)
    """Human-readable details (may be empty)."""
    last_transition_time: datetime
    """When status last changed (not when the condition was last written)."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this condition was computed from."""


class Progress(_Status):
    """Training progress, read from the trainer's metrics endpoint."""

    step: int | None = Field(default=None, ge=0)
    """Last completed optimizer step."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps of the whole run."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Training throughput over all processes."""
    eta: str | None = None
    """Estimated time to the end of training, e.g. 14h02m (0s once training succeeded)."""
    last_step_time: datetime | None = None
    """When the last step completed; no change for spec.stallTimeout restarts the attempt."""
    scrape_time: datetime | None = None
    """When the operator last read the trainer's metrics."""
    peak_memory_bytes: int | None = Field(default=None, ge=0)
    """Measured peak memory of one process: GPU memory allocated (rank 0's while it runs, the
    busiest rank's once it succeeded), or the peak resident set size on CPU."""
    memory_estimate_bytes: int | None = Field(default=None, ge=0)
    """The memory model's estimate for one process of the stage (docs/fit.md)."""
    device_memory_bytes: int | None = Field(default=None, ge=0)
    """Total memory of the GPU the stage runs on (absent on CPU)."""


class SourceStatus(_Status):
    """One data source's accounting, from the preprocess stage's result (docs/preprocessing.md)."""

    name: str = Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """The source's name (data.sources[].name; train-<i> and validation-<i> for data.train and
    data.validation entries)."""
    split: Literal["train", "validation"]
    """The split the source feeds."""
    files: int = Field(ge=0)
    """Files read from the source (after its exclude globs)."""
    excluded_files: int | None = Field(default=None, ge=0)
    """Files its exclude globs left out."""
    rows_read: int = Field(ge=0)
    """Rows read from its files."""
    accepted: int = Field(ge=0)
    """Rows kept after filtering."""
    rejected: dict[str, NonNegativeInt] = Field(default_factory=dict)
    """Rows rejected, by reason."""
    selected: int = Field(ge=0)
    """Rows the mixture took: its fraction (whole passes, then a seeded sample), capped at
    maxRows."""
    tokens: int = Field(ge=0)
    """Tokens the selected rows contribute to the packed dataset."""
    commit: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")
    """A Hub dataset's revision as the commit it resolved to (and the cache key holds)."""


class DatasetStatus(_Status):
    """The tokenized dataset the run trains on (the preprocess stage's result)."""

    cache_key: str | None = None
    """Content key of the cached dataset (sha256 over inputs, tokenizer and packing settings)."""
    cache_hit: bool | None = None
    """True when the dataset was already in the cache and preprocessing only reused it."""
    uri: str | None = None
    """Where the tokenized dataset is stored."""
    train_tokens: int | None = Field(default=None, ge=0)
    """Tokens in the training split."""
    validation_tokens: int | None = Field(default=None, ge=0)
    """Tokens in the validation split."""
    rows_read: int | None = Field(default=None, ge=0)
    """Rows (documents, conversations or pairs) read from the input files."""
    accepted: int | None = Field(default=None, ge=0)
    """Rows kept after filtering."""
    blocks: int | None = Field(default=None, ge=0)
    """Packed training blocks of data.blockSize tokens, over both splits."""
    rejected_rows: dict[str, int] = Field(default_factory=dict)
    """Rows rejected by preprocessing, by reason."""
    sources: list[SourceStatus] = Field(default_factory=list, max_length=SOURCE_ROWS)
    """Each source's files, rows read, accepted, rejected by reason, selected and tokens, in the
    order the stage processed them (by name within each split)."""


class SanityRung(_Status):
    """One rung of the sanity ladder that has finished, with the loss it saw."""

    rung: int = Field(ge=1)
    """The rung's number, from 1, in the order of spec.sanity.rungs."""
    passed: bool
    """Whether the rung's gate passed."""
    first_loss: float | None = None
    """Mean training loss over the rung's first steps (a window of up to half the rung)."""
    last_loss: float | None = None
    """Mean training loss over the rung's last steps (the same window)."""
    loss_drop: float | None = None
    """Relative drop from first to last loss (0.05 is 5%), compared with minLossDrop."""
    max_grad_norm: float | None = None
    """Largest gradient norm seen on the rung, compared with maxGradNorm."""
    steps: int | None = Field(default=None, ge=0)
    """Optimizer steps the rung ran."""
    peak_memory_bytes: int | None = Field(default=None, ge=0)
    """Measured peak memory of the rung's busiest process: GPU memory allocated
    (torch.cuda.max_memory_allocated), or the peak resident set size on CPU."""
    peak_reserved_bytes: int | None = Field(default=None, ge=0)
    """Peak GPU memory reserved by PyTorch's caching allocator (what the GPU had to hold)."""
    memory_estimate_bytes: int | None = Field(default=None, ge=0)
    """The memory model's estimate for one process of the rung (docs/fit.md)."""
    device_memory_bytes: int | None = Field(default=None, ge=0)
    """Total memory of the rung's GPU (absent on CPU)."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """The rung's throughput over all its processes."""


class MemoryTerm(_Status):
    """One term of the memory model's estimate (docs/fit.md)."""

    name: str = Field(max_length=64)
    """The term, e.g. weights, optimizer states, activations."""
    bytes: int = Field(ge=0)
    """Its bytes per process."""


class FitRow(_Status):
    """One stage's line of the fit table: the memory model's estimate per process against the
    GPU, computed by the preprocess stage from the model's config.json (docs/fit.md)."""

    stage: str = Field(max_length=64)
    """The stage: sanity-<n>, train or merge."""
    world_size: int = Field(ge=1)
    """Processes of the stage."""
    device: Literal["gpu", "cpu"]
    """Where its processes compute."""
    estimate_bytes: int = Field(ge=0)
    """Estimated peak memory of one process, CUDA context and fragmentation margin included."""
    allocated_bytes: int = Field(ge=0)
    """The part torch.cuda.max_memory_allocated would show."""
    host_bytes: int = Field(ge=0)
    """Host memory per process for what DeepSpeed offloads to the CPU."""
    largest: list[MemoryTerm] = Field(default_factory=list, max_length=8)
    """The largest terms of the estimate, largest first."""
    fits: bool | None = None
    """Whether the estimate fits the GPU (absent: no GPU memory known, or a CPU stage)."""


class CheckpointStatus(_Status):
    """The newest complete checkpoint."""

    step: int | None = Field(default=None, ge=0)
    """Optimizer step of the checkpoint."""
    uri: str | None = None
    """Where it is stored."""


class Outputs(_Status):
    """What the run produced."""

    model: str | None = None
    """The final (or merged) model."""
    adapter: str | None = None
    """The trained adapter (adapter runs)."""
    hub_repo: str | None = None
    """The Hub repository the model was pushed to (output.push), ORG/NAME."""
    hub_commit: str | None = None
    """The commit of that push in the repository (40 hex)."""


class Evaluation(_Status):
    """The merge stage's evaluation on the validation split."""

    perplexity: float | None = Field(default=None, ge=0)
    """Validation perplexity of the merged model."""
    eval_loss: float | None = None
    """Mean validation loss per token (the log of the perplexity)."""


class Upstream(_Status):
    """The run named by spec.model.fromRun, once it has succeeded."""

    run: str
    """Name of the upstream TrainingRun."""
    model: str
    """Its output model, which this run trains from."""


class Attempt(_Status):
    """One attempt of the training stage (a PyTorchJob); the history survives the child."""

    attempt: int = Field(ge=1)
    """The attempt's number, from 1; its PyTorchJob is <run>-train-<attempt>."""
    reason: Literal["initial", "failure", "stall"]
    """Why it started: the first attempt, or a restart after a failed or stalled one."""
    start_time: datetime
    """When the operator started it."""
    result: Literal["Succeeded", "Failed", "Stalled"] | None = None
    """How it ended; absent while it runs."""
    exit_code: int | None = None
    """The decisive pod's exit code, when it failed with one."""
    message: str | None = None
    """Why it failed or stalled (redacted)."""
    finish_time: datetime | None = None
    """When it ended."""


class TrainingRunStatus(_Status):
    """Observed state, written by the operator (conditions are the truth, phase is for humans)."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status describes (kstatus)."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    """Ready, Reconciling, Stalled (kstatus) and the stage conditions; one entry per type."""
    phase: (
        Literal[
            "Pending",
            "Preprocessing",
            "Sanity",
            "Training",
            "Merging",
            "Succeeded",
            "Failed",
            "Suspended",
        ]
        | None
    ) = None
    """The current stage, for humans and printer columns (the conditions are the truth)."""
    upstream: Upstream | None = None
    """The upstream run this run trains from (spec.model.fromRun)."""
    dataset: DatasetStatus | None = None
    """The tokenized dataset."""
    sanity: list[SanityRung] = Field(default_factory=list)
    """The sanity rungs that have finished, in order."""
    fit: list[FitRow] = Field(default_factory=list, max_length=FIT_ROWS)
    """The fit table of every GPU stage, when only the model's config.json knew its size (the
    preprocess stage's result)."""
    progress: Progress | None = None
    """Step, loss, throughput and ETA of the current attempt."""
    checkpoint: CheckpointStatus | None = None
    """The newest complete checkpoint."""
    outputs: Outputs | None = None
    """Final artifacts."""
    evaluation: Evaluation | None = None
    """Validation perplexity and loss of the merged model."""
    completed_stages: list[str] = Field(default_factory=list)
    """Stages that finished (preprocess, sanity-<n>, train, merge): never run again, even when
    their child is gone."""
    attempts: int | None = Field(default=None, ge=0)
    """Training attempts started so far (restarts + 1)."""
    attempt_history: list[Attempt] = Field(default_factory=list)
    """Every training attempt: why it started, how it ended; restarts and backoff count these."""
