"""Stage configs: the trainer's side of the stage contract (`kubetrain.dev/stage-v1`).

The operator's `plan` writes one JSON file per stage; each stage entry point loads it here and
nothing else. Unknown fields are errors, so an operator and a trainer image that disagree fail
loudly at start-up (exit 2) instead of silently ignoring a setting. Field names are camelCase on
the wire, like the CRD.

No field has a default: the plan writes every field (null where a setting is unset), so the API's
defaults are the only defaults and a config that leaves one out is refused
(tests/operator/test_contract.py).

    python -m kubetrain_trainer preprocess --config preprocess.json
    torchrun ... -m kubetrain_trainer train --config train.json
    python -m kubetrain_trainer merge --config merge.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetrain_contract import memory
from kubetrain_contract.configs import STAGE_API_VERSION
from kubetrain_contract.limits import MAX_STEPS
from kubetrain_contract.methods import DataFormat, Method

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
#: A step count: positive and at most the contract's MAX_STEPS (past it counters overflow).
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Uri = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^[^\s\x00-\x1f\x7f]+$")]


class ConfigError(ValueError):
    """A stage config that cannot be used: exit code 2, do not retry."""


class _Config(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


class S3Settings(_Config):
    """Where s3:// URIs live; credentials come from the environment (AWS_* via secretKeyRef)."""

    endpoint: str
    """Endpoint URL for S3-compatible stores; empty for AWS."""
    region: str
    """Region; empty lets boto3 decide."""
    allow_insecure_endpoint: bool
    """Allow a plain http:// endpoint (a trusted in-cluster store); https:// otherwise."""


AWS_S3 = S3Settings(endpoint="", region="", allow_insecure_endpoint=False)
"""No S3 settings of one's own: AWS's endpoints, boto3's region, https only. For storage calls made
without a stage config (tools, tests); a stage config always carries its own `s3`."""


class Fields(_Config):
    """Names of the input fields per format."""

    text: str
    """Field holding the document (format text): spec.data.textField."""
    messages: str
    """Field holding the list of {role, content} messages (format chat)."""
    prompt: str
    """Prompt field (format preference)."""
    chosen: str
    """Preferred answer field (format preference)."""
    rejected: str
    """Dispreferred answer field (format preference)."""


class TokenizerTrain(_Config):
    """Train a byte-level BPE tokenizer on the training inputs."""

    vocab_size: int = Field(ge=512)
    """Vocabulary size including the special tokens (≥ 512: bytes plus merges)."""
    special_tokens: list[str] = Field(min_length=1)
    """Special tokens; the first is the end-of-document (EOS) token."""
    min_frequency: PositiveInt
    """Merges seen fewer times are not learned."""


class TokenizerSource(_Config):
    """Exactly one of: a tokenizer directory, or the recipe to train one."""

    uri: Uri | None
    """Directory with tokenizer.json (and tokenizer_config.json) loaded with transformers."""
    train: TokenizerTrain | None
    """The BPE training recipe (pretraining from scratch)."""

    @model_validator(mode="after")
    def _one(self) -> TokenizerSource:
        if (self.uri is None) == (self.train is None):
            raise ValueError("tokenizer: exactly one of uri and train is required")
        return self


class Architecture(_Config):
    """A Llama-family model built from a config (pretraining from scratch)."""

    family: Literal["llama"]
    """Model family; llama (LlamaForCausalLM)."""
    hidden_size: PositiveInt
    """Width of the residual stream."""
    layers: PositiveInt
    """Decoder layers."""
    heads: PositiveInt
    """Attention heads."""
    kv_heads: PositiveInt
    """Key/value heads (grouped-query attention); the plan resolves the default."""
    intermediate_size: PositiveInt
    """MLP width; the plan resolves the default."""
    context_length: PositiveInt
    """max_position_embeddings."""
    vocab_size: PositiveInt | None
    """None: the tokenizer's vocabulary size."""
    rope_theta: float
    """RoPE base frequency."""
    tie_word_embeddings: bool
    """Share input and output embeddings."""


def _setup(value: dict[str, Any]) -> dict[str, Any]:
    """A memory.Setup as the plan wrote it: every field, nothing else."""
    try:
        memory.Setup.from_dict(value)
    except TypeError as error:
        raise ValueError(f"not a memory setup: {error}") from None
    return value


SetupDict = Annotated[dict[str, Any], AfterValidator(_setup)]


class MemoryPlan(_Config):
    """The stage's memory setup (the plan's), checked against the real device before loading."""

    setup: SetupDict
    """memory.Setup.to_dict() of this stage's processes."""
    gpu_memory_bytes: int | None = Field(ge=1)
    """The GPU memory the plan checked against; None: the run declares none."""
    gpu_memory_source: str | None
    """Where that figure came from (resources.gpuMemory, a node label, the cluster default)."""


class FitRequest(_Config):
    """Size the model from its config.json (or the tokenizer) and check every stage before
    tokenizing: the plan could not (docs/fit.md)."""

    gpu_memory_bytes: int = Field(ge=1)
    """One GPU's memory."""
    gpu_memory_source: str
    """Where that figure came from."""
    model_uri: Uri | None
    """The model whose config.json sizes it (local, pvc, s3:// or hf://); None: architecture."""
    architecture: Architecture | None
    """A model built from scratch, sized with the tokenizer's vocabulary."""
    setups: list[SetupDict] = Field(min_length=1)
    """memory.Setup of every sanity, train and merge stage."""


class HubSource(_Config):
    """Which files of a Hub dataset a source reads (hf://datasets/ORG/NAME[@REVISION])."""

    config: str | None
    """The dataset's config (subset); None: every config."""
    split: str | None
    """The dataset's split; None: every split."""
    files: list[str]
    """Globs of repository files to read; empty: the config's and split's Parquet/JSONL files."""


class SourceConfig(_Config):
    """One data source and its terms (spec.data.sources[], or a plain data.train entry)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Unique across the config: names the source in the result, metrics and errors."""
    split: Literal["train", "validation"]
    """Which split its rows go to."""
    uri: Uri
    """A file, prefix or glob (local or s3://), or hf://datasets/ORG/NAME[@REVISION]."""
    exclude: list[str]
    """fnmatch globs on file paths below the prefix: matching files are not read."""
    fraction: float | None = Field(gt=0.0, le=100.0)
    """Share of accepted rows kept (> 1 repeats); None: every row once."""
    max_rows: int | None = Field(ge=1)
    """Cap on selected rows (after fraction); None: no cap."""
    optional: bool
    """True: yielding no rows is allowed."""
    max_rejected_fraction: Fraction | None
    """This source's rejection limit; None: the config's maxRejectedFraction."""
    hub: HubSource | None
    """Set for Hub datasets (hf://datasets/…), else None."""

    @property
    def selects(self) -> bool:
        """True when the source keeps other than every accepted row exactly once."""
        return self.max_rows is not None or self.fraction not in (None, 1.0)


class PreprocessConfig(_Config):
    """Read, validate, tokenize and pack the data into a content-addressed Arrow dataset."""

    api_version: str = Field(alias="apiVersion")
    """The stage contract's version: `parse_stage_config` refuses all but STAGE_API_VERSION."""
    stage: Literal["preprocess"]
    """Which stage this config is for."""
    run: str
    """The TrainingRun's name (logs, metrics labels)."""
    format: DataFormat
    """text, chat or preference rows."""
    sources: list[SourceConfig] = Field(min_length=1)
    """Every input with its terms: at least one of split train; no validation source: hold out
    validationFraction. Processed sorted by (split, name), whatever their order here."""
    validation_fraction: Fraction
    """Share of training documents held out when there are no validation files."""
    fields: Fields
    """Input field names per format."""
    text_split: Literal["paragraph", "line"]
    """.txt files: blank-line paragraphs or single lines per document."""
    document_separator: str | None = Field(min_length=1, max_length=256)
    """.txt: documents end at this text (e.g. <|endoftext|>); None: textSplit decides."""
    cross_document_attention: bool
    """Text packing: False restarts position_ids per document, keeping attention within it."""
    chat_template: Literal["chatml", "tulu", "llama3"] | None
    """A named chat template; None: the tokenizer's own."""
    block_size: PositiveInt
    """Tokens per packed sequence."""
    partial_block: Literal["pad", "drop"]
    """The last partial block of text data: padded (masked) or dropped."""
    max_rejected_fraction: Fraction
    """Fail (exit 2) above this share of rejected rows."""
    tokenizer: TokenizerSource
    """The tokenizer to load or train."""
    cache_root: Uri
    """Datasets are published under <cacheRoot>/datasets/<key>/."""
    dataset_pointer: Uri
    """Where the stage writes {cacheKey, uri} for the stages after it (<output>/dataset.json)."""
    seed: int
    """Seed for the validation hold-out and shard order."""
    workers: int | None = Field(ge=1, le=256)
    """Worker processes; None: from the cgroup CPU and memory limits."""
    metrics_port: int = Field(ge=0, le=65535)
    """Prometheus port (0: none)."""
    s3: S3Settings
    """S3 settings for s3:// URIs."""
    fit: FitRequest | None
    """Check that every stage fits its GPU before tokenizing; None: the plan did (or no GPU
    memory is known)."""

    @model_validator(mode="after")
    def _sources_named_once(self) -> PreprocessConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("sources: a name appears twice — name every source once")
        if not any(s.split == "train" for s in self.sources):
            raise ValueError("sources: no source of split train — add one")
        return self

    def split_sources(self, split: str) -> list[SourceConfig]:
        """The sources of a split in canonical order (by name)."""
        return sorted((s for s in self.sources if s.split == split), key=lambda s: s.name)


class AdapterConfig(_Config):
    """Full fine-tune or a LoRA/QLoRA adapter (spec.method.adapter)."""

    type: Literal["none", "lora", "qlora"]
    """none (full fine-tune), lora or qlora."""
    r: PositiveInt
    """LoRA rank."""
    alpha: float
    """LoRA scaling (alpha / r)."""
    dropout: Fraction
    """Dropout on the LoRA path."""
    target_modules: list[str]
    """Module names to adapt."""


class DPOConfig(_Config):
    """Direct preference optimisation settings (spec.method.dpo)."""

    beta: float
    """Strength of the KL penalty towards the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge"]
    """DPO loss variant."""
    max_prompt_length: PositiveInt | None
    """Longest prompt kept (tokens); None: no limit of its own."""
    precompute_reference_log_probs: bool
    """Reference log-probabilities computed once before training; the reference model is freed."""


class ModelSource(_Config):
    """Exactly one of: a pretrained directory (uri) or an architecture to build."""

    uri: Uri | None
    """A pretrained model directory (local, s3:// or hf://)."""
    architecture: Architecture | None
    """Build a new model with random weights."""
    quantized: bool
    """The base at uri is pre-quantized: merging an adapter into it is refused."""

    @model_validator(mode="after")
    def _one(self) -> ModelSource:
        if (self.uri is None) == (self.architecture is None):
            raise ValueError("model: exactly one of uri and architecture is required")
        return self


class Optimization(_Config):
    """Optimisation hyper-parameters (spec.training; a sanity rung's overrides applied)."""

    epochs: float | None
    """Passes over the data; exclusive with maxSteps."""
    max_steps: Steps | None
    """Optimizer steps; exclusive with epochs."""
    learning_rate: float = Field(gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    """Schedule after warm-up."""
    warmup_ratio: Fraction
    """Share of steps spent warming up linearly."""
    weight_decay: float
    """AdamW weight decay."""
    micro_batch_size: PositiveInt
    """Sequences per process per forward pass."""
    gradient_accumulation_steps: PositiveInt
    """Micro-batches per optimizer step."""
    precision: Literal["bf16", "fp16", "fp32"]
    """Compute precision."""
    optimizer: str
    """TrainingArguments.optim name."""
    max_grad_norm: float
    """Gradient clipping norm (0 disables)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass."""
    weight_precision: Literal["fp32", "bf16"]
    """The dtype a full fine-tune loads its weights in."""
    attention: Literal["sdpa", "eager", "flash_attention_2"]
    """transformers' attn_implementation."""
    compile: bool
    """torch.compile the model."""
    seed: int
    """Seed for weights, data order and dropout."""
    logging_steps: Steps
    """Log a line every this many steps."""
    eval_steps: Steps | None
    """Evaluate every this many steps; None: at the end only."""
    max_grad_norm_abort: float
    """Abort (exit 3) above this gradient norm."""

    @model_validator(mode="after")
    def _length(self) -> Optimization:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("training: exactly one of epochs and maxSteps is required")
        return self


class Checkpointing(_Config):
    """Checkpoint cadence and retention (spec.checkpoints)."""

    every_steps: Steps
    """Save every this many optimizer steps."""
    keep: PositiveInt
    """Newest complete checkpoints kept."""


class SanityGate(_Config):
    """Pass/fail criteria of the sanity stage."""

    min_loss_drop: Fraction
    """Required relative loss drop from the first to the last logged steps."""
    max_grad_norm: float = Field(gt=0)
    """Gradient norms above this fail the gate."""


class Distributed(_Config):
    """How the processes share the work (spec.distributed, resolved by the plan)."""

    zero_stage: int = Field(ge=0, le=3)
    """0: DDP or one process; 1–3: DeepSpeed ZeRO stage."""
    deepspeed: dict[str, Any] | None
    """The DeepSpeed config generated by the operator's plan (None for zeroStage 0)."""
    world_size: PositiveInt
    """Processes the plan expects (nodes × processes per node)."""


class TrainConfig(_Config):
    """One training job (the sanity gate is the same stage with `sanity` set and few steps)."""

    api_version: str = Field(alias="apiVersion")
    """The stage contract's version: `parse_stage_config` refuses all but STAGE_API_VERSION."""
    stage: Literal["train", "sanity"]
    """train, or sanity (one rung of the sanity ladder)."""
    run: str
    """The TrainingRun's name."""
    method: Method
    """pretrain, sft or dpo."""
    model: ModelSource
    """The starting weights."""
    tokenizer_uri: Uri | None
    """None: the tokenizer saved with the dataset (trained) or the model's own."""
    dataset_pointer: Uri
    """<output>/dataset.json, written by preprocessing."""
    adapter: AdapterConfig
    """Adapter settings."""
    dpo: DPOConfig | None
    """DPO settings (method dpo only)."""
    training: Optimization
    """Optimisation hyper-parameters."""
    checkpoints: Checkpointing
    """Checkpoint cadence and retention."""
    distributed: Distributed
    """DDP or DeepSpeed, and the world size the plan expects."""
    sanity: SanityGate | None
    """The rung's pass criteria (stage sanity only)."""
    output_uri: Uri
    """Run output root: checkpoints/, final/ (train) or sanity/ (sanity stage) go below it."""
    metrics_port: int = Field(ge=0, le=65535)
    """Prometheus port of rank 0 (0: none)."""
    s3: S3Settings
    """S3 settings for s3:// URIs."""
    memory: MemoryPlan
    """The memory setup the plan estimated; re-checked against the device before loading."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if (self.stage == "sanity") != (self.sanity is not None):
            raise ValueError("sanity: required for stage sanity and only there")
        if (self.method == "dpo") != (self.dpo is not None):
            raise ValueError("dpo: required for method dpo and only there")
        if self.adapter.type == "none" and self.model.quantized:
            raise ValueError(
                "model.quantized: a full fine-tune of a quantized base is not possible"
            )
        return self


class MergeConfig(_Config):
    """Merge an adapter into the full-precision base, evaluate, export with a model card."""

    api_version: str = Field(alias="apiVersion")
    """The stage contract's version: `parse_stage_config` refuses all but STAGE_API_VERSION."""
    stage: Literal["merge"]
    """Which stage this config is for."""
    run: str
    """The TrainingRun's name."""
    method: Method
    """pretrain, sft or dpo (for the model card)."""
    model: ModelSource
    """The base model the adapter was trained on."""
    adapter: AdapterConfig
    """The trained adapter's settings."""
    merge: bool
    """Merge the adapter into the base and export merged/."""
    dataset_pointer: Uri
    """The dataset (its validation split is evaluated)."""
    output_uri: Uri
    """The run's output root (final/ is read, merged/ written)."""
    precision: Literal["bf16", "fp16", "fp32"]
    """Precision of the evaluation."""
    micro_batch_size: PositiveInt
    """Sequences per evaluation batch."""
    attention: Literal["sdpa", "eager", "flash_attention_2"]
    """transformers' attn_implementation for the evaluation."""
    memory: MemoryPlan
    """The evaluation's memory setup, re-checked against the device before loading."""
    max_perplexity: float | None = Field(gt=0)
    """Validation perplexity above this fails the stage (exit 3); None: not checked."""
    metrics_port: int = Field(ge=0, le=65535)
    """Prometheus port (0: none)."""
    s3: S3Settings
    """S3 settings for s3:// URIs."""


StageConfig = PreprocessConfig | TrainConfig | MergeConfig
_BY_STAGE: dict[str, type[BaseModel]] = {
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "sanity": TrainConfig,
    "merge": MergeConfig,
}


def parse_stage_config(data: Any, source: str = "<config>") -> StageConfig:
    """Validate a stage config document; raises :class:`ConfigError` naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a JSON object, got {type(data).__name__} — pass the stage "
            "config file the operator wrote (kubetrain render / the run's ConfigMap)"
        )
    if data.get("apiVersion") != STAGE_API_VERSION:
        raise ConfigError(
            f"{source}: apiVersion: expected {STAGE_API_VERSION!r}, got {data.get('apiVersion')!r}"
            " — the operator and the trainer image are from different releases; align them"
        )
    model = _BY_STAGE.get(str(data.get("stage")))
    if model is None:
        raise ConfigError(
            f"{source}: stage: expected one of {', '.join(sorted(_BY_STAGE))}, "
            f"got {data.get('stage')!r} — {_SAME_RELEASE}"
        )
    try:
        # Wire names only: a config written with Python names (world_size) is not the contract.
        return model.model_validate(data, by_alias=True, by_name=False)  # type: ignore[return-value]
    except ValidationError as error:
        lines = [
            f"{source}: {'.'.join(str(p) for p in e['loc']) or '(root)'}: {_explain(e)}"
            for e in error.errors(include_url=False)
        ]
        raise ConfigError("\n".join(lines)) from None


#: Said after every problem the operator could have caused: it writes these files.
_SAME_RELEASE = (
    "the operator writes this file, so check that operator and trainer images are the same release"
)


def _explain(error: Any) -> str:
    """pydantic's message for one field, the value it got, and what to do about it."""
    kind, message = str(error["type"]), str(error["msg"])
    value = error.get("input")
    got = ""
    if kind != "missing" and isinstance(value, str | int | float | bool | None):
        shown = repr(value)
        got = f" (got {shown[:60] + '…' if len(shown) > 60 else shown})"
    if kind == "extra_forbidden":
        return (
            f"unknown field{got} — this trainer image does not know it: {_SAME_RELEASE}; "
            "remove it from a hand-written config"
        )
    if kind == "missing":
        return f"required field is missing — set it; {_SAME_RELEASE}"
    if kind == "value_error":  # the cross-field rules above: their message says what is wrong
        message = message.removeprefix("Value error, ")
        return (
            f"{message} — fix it in the TrainingRun and render the stage configs again "
            "(or fix the hand-written config)"
        )
    if kind in ("literal_error", "enum"):
        return f"{message}{got} — use one of these values; {_SAME_RELEASE}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{message}{got} — use a value in that range (the run's field of the same name)"
    if kind.endswith(("_type", "_parsing")):
        return f"{message}{got} — write the value with that JSON type; {_SAME_RELEASE}"
    return f"{message}{got} — fix the field in the stage config; {_SAME_RELEASE}"


def load_stage_config(path: str | Path) -> StageConfig:
    """Read and validate a stage config file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the stage config: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}:{error.lineno}: invalid JSON: {error.msg} — the config must be a JSON object"
        ) from None
    return parse_stage_config(data, str(path))


def dump_stage_config(config: BaseModel) -> str:
    """Canonical JSON: camelCase, sorted keys, so two renders are byte-identical."""
    return json.dumps(config.model_dump(mode="json", by_alias=True), sort_keys=True, indent=2)
