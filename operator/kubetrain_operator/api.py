"""The TrainingRun API (`kubetrain.dev/v1alpha1`): parse, default and validate a run — pure.

One source of truth: the CRD (`crd.py`) is generated from these models and from the one table of
rules (`rules.py`); `kubetrain validate` and the operator's admission both call :func:`parse_run`,
which reports every problem of a run at once: field errors and rule violations together. Field
docstrings become the CRD's descriptions, so `kubectl explain trainingrun.spec.…` shows them.
Defaults live here and only here: the stage configs `plan` writes carry every value explicitly.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetrain_contract.limits import MAX_STEPS
from kubetrain_contract.methods import DataFormat, Method
from kubetrain_operator import rules
from kubetrain_operator.rules import DNS1035, DNS1123_SUBDOMAIN, MAX_NAME_LENGTH

API_GROUP = "kubetrain.dev"
API_VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"

__all__ = ["DNS1035", "DNS1123_SUBDOMAIN", "MAX_NAME_LENGTH"]

#: A URI: no whitespace or control characters; the field rules (rules.FIELD_RULES) do the rest.
URI_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
#: Longest URI (and the CEL cost bound of every rule on one).
MAX_URI_LENGTH = 1024
#: Most files, prefixes or globs in data.train / data.validation (a glob covers many files).
MAX_DATA_URIS = 256
#: Most sources in data.sources plus data.validationSources (bounds the `source` metric label).
MAX_SOURCES = 64
#: Most exclude globs per source.
MAX_EXCLUDES = 32
#: A source's name: a DNS-1123 label (it is a metric label and a key in status).
SOURCE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_SOURCE_NAME = 40
DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
#: An http(s) endpoint: host (or [IPv6]), port and path only — no user:password@ (credentials
#: belong in the Secret), no query, nothing a shell or an env consumer could read as syntax.
ENDPOINT_PATTERN = (
    r"^(https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[A-Za-z0-9._~%/\-]*)?)?$"
)
#: Kubernetes label values (also node selector and toleration values): at most 63 characters.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: Kubernetes label keys (qualified names): an optional DNS-1123 prefix and a name of at most 63.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
#: A document separator line: printable, one line.
SEPARATOR_PATTERN = r"^[^\x00-\x1f\x7f]+$"
#: Byte-level BPE needs the 256-byte alphabet; below 512 there is no room for merges.
MIN_TRAINED_VOCAB = 512
#: Marks a string schema as a URI of a kind (crd.py attaches the kind's field rules as CEL).
URI_KIND_KEY = "x-kubetrain-uri"


def _field_rules(kind: str) -> AfterValidator:
    def check(value: str) -> str:
        found = rules.field_problems(kind, value)
        if found:
            raise ValueError("; ".join(found))
        return value

    return AfterValidator(check)


def _uri_field(kind: str) -> Any:
    return Field(
        min_length=1,
        max_length=MAX_URI_LENGTH,
        pattern=URI_PATTERN,
        json_schema_extra={URI_KIND_KEY: kind},
    )


#: Outputs and caches: s3://, pvc://CLAIM/path, file:// or a local path (local runs).
Uri = Annotated[str, _uri_field("uri"), _field_rules("uri")]
#: Data: the same, and hf://datasets/ORG/NAME[@REVISION] (a Hugging Face Hub dataset).
DataUri = Annotated[str, _uri_field("data-uri"), _field_rules("data-uri")]
#: Models and tokenizers: the same, and hf://ORG/NAME[@REVISION] from the Hugging Face Hub.
ModelUri = Annotated[str, _uri_field("model-uri"), _field_rules("model-uri")]
Endpoint = Annotated[
    str,
    Field(max_length=512, pattern=ENDPOINT_PATTERN, json_schema_extra={URI_KIND_KEY: "endpoint"}),
    _field_rules("endpoint"),
]
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]
#: A container image reference (registry/name:tag or @digest): no spaces, nothing a shell reads.
ImageReference = Annotated[str, Field(max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@\-]*$")]
#: Names of ServiceAccounts and Secrets.
ObjectName = Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
]


def _quantity_text(value: Any) -> Any:
    """`cpu: 64` is as valid as `cpu: "64"` (int-or-string, as in Kubernetes); kept as text."""
    if type(value) is int:
        if value < 0:
            raise ValueError("a quantity cannot be negative — write e.g. 8 or 48Gi")
        return str(value)
    if type(value) is float:
        raise ValueError('is not an integer or a string — write e.g. "0.5" or 500m')
    return value


#: A Kubernetes quantity: an integer or a string such as 48Gi, 500m, 8.
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    Field(max_length=64, pattern=QUANTITY_PATTERN),
    WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN, "maxLength": 64}
    ),
]


class SpecError(ValueError):
    """A problem in a TrainingRun: the field path, what is wrong, and what to do."""

    def __init__(self, path: str, problem: str, fix: str = "") -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" + (f" — {self.fix}" if self.fix else "")


class SpecErrors(SpecError):
    """Several problems found together, so the user sees all of them at once (the first one's
    path, problem and fix are this error's own)."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.path, first.problem, first.fix)

    def __str__(self) -> str:
        return "; ".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class Problem:
    """One validation problem, as `kubetrain validate` prints it and the operator reports it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class _Model(BaseModel):
    """camelCase on the wire, unknown fields refused, field docstrings kept as descriptions;
    floats are finite (YAML's .inf and .nan would reach the stage JSON as Infinity and NaN, which
    JSON does not have and the API server cannot store)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        validate_default=True,
    )


# ---------------------------------------------------------------------------------------------- model


class Architecture(_Model):
    """A model built from scratch (pretraining); its vocabulary comes from the tokenizer."""

    family: Literal["llama"] = "llama"
    """Model family; `llama` (LlamaForCausalLM) is the one built from scratch."""
    hidden_size: PositiveInt
    """Width of the residual stream (d_model)."""
    layers: PositiveInt
    """Number of decoder layers."""
    heads: PositiveInt
    """Attention heads; must divide hiddenSize."""
    kv_heads: PositiveInt | None = None
    """Key/value heads for grouped-query attention; must divide heads. Default: heads."""
    intermediate_size: PositiveInt | None = None
    """MLP width. Default: 8/3 × hiddenSize rounded up to a multiple of 64 (the Llama ratio)."""
    context_length: PositiveInt
    """Maximum sequence length (max_position_embeddings); data.blockSize must not exceed it."""
    vocab_size: PositiveInt | None = None
    """Embedding rows. Default: the tokenizer's vocabulary size (set only to pad it up)."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """RoPE base frequency."""
    tie_word_embeddings: bool = False
    """Share input and output embeddings."""


class ModelSpec(_Model):
    """Where the weights come from: exactly one of uri, architecture and fromRun."""

    uri: ModelUri | None = None
    """A pretrained model directory: s3://…, pvc://CLAIM/path, hf://ORG/NAME[@REVISION], or a
    local path (local runs)."""
    architecture: Architecture | None = None
    """Build a new model with random weights (pretraining from scratch)."""
    from_run: Annotated[str, Field(max_length=MAX_NAME_LENGTH, pattern=DNS1035)] | None = None
    """Name of a TrainingRun in the same namespace whose output model this run starts from."""
    quantized: bool = False
    """Declare that the base at uri is already quantized (e.g. a bnb-4bit export): merging into it is refused."""


class TokenizerTraining(_Model):
    """Train a byte-level BPE tokenizer on data.train with `tokenizers`; saved with the dataset."""

    vocab_size: int = Field(ge=MIN_TRAINED_VOCAB, le=1_048_576)
    """Vocabulary size including the special tokens; it becomes the model's vocabulary size."""
    special_tokens: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["<|endoftext|>"], max_length=64
    )
    """Special tokens, each once; the first is the end-of-document (EOS) token."""
    min_frequency: PositiveInt = 2
    """Merges that occur fewer times are not learned."""

    # vocabSize ≥ 512 always leaves room for the 256 bytes and the ≤ 64 special tokens.
    @field_validator("special_tokens")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("contains duplicates — list each token once")
        return value


class TokenizerSpec(_Model):
    """The tokenizer: trained here, loaded from uri, or (when absent) the model's own."""

    uri: ModelUri | None = None
    """A tokenizer directory (tokenizer.json and friends) or hf://ORG/NAME; default: the model's."""
    train: TokenizerTraining | None = None
    """Train a BPE tokenizer on the training data (pretraining from scratch only)."""


# ----------------------------------------------------------------------------------------------- data


def _unique(value: list[str] | None) -> list[str] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError("lists a URI twice — list each file, prefix or glob once")
    return value


#: A list of files, prefixes (s3://bucket/dir/) or globs (s3://bucket/dir/*.jsonl, data/*.txt).
DataUris = Annotated[
    list[DataUri], Field(min_length=1, max_length=MAX_DATA_URIS), AfterValidator(_unique)
]
#: An fnmatch glob on a file's path below its source's prefix (`*` crosses `/`).
ExcludeGlob = Annotated[str, Field(min_length=1, max_length=256, pattern=SEPARATOR_PATTERN)]
#: A glob of Hub dataset repository files (Parquet, JSON Lines).
HubFileGlob = Annotated[str, Field(min_length=1, max_length=256, pattern=SEPARATOR_PATTERN)]


class Source(_Model):
    """One data source with its own terms: what to read, what to leave out, how much to keep.

    Selection happens in the preprocess stage, deterministic under training.seed
    (docs/preprocessing.md): of the source's accepted rows, `fraction` keeps floor(fraction)
    whole passes and a seeded sample of the remainder, then `maxRows` keeps the first rows of that
    seeded order."""

    name: Annotated[
        str, Field(min_length=1, max_length=MAX_SOURCE_NAME, pattern=SOURCE_NAME_PATTERN)
    ]
    """The source's name (a DNS-1123 label, unique across sources and validationSources): it
    names the source in status, metrics and errors."""
    uri: DataUri
    """A file, prefix (s3://bucket/dir/) or glob, as data.train entries; or
    hf://datasets/ORG/NAME[@REVISION], a Hub dataset pinned to the commit its revision resolves to."""
    exclude: Annotated[list[ExcludeGlob], Field(max_length=MAX_EXCLUDES)] = Field(
        default_factory=list
    )
    """fnmatch globs on each file's path below the prefix (e.g. "*/processed/*"); matching files
    are not read and are counted as excluded files."""
    fraction: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    """Share of the source's accepted rows to keep: ≤ 1 subsamples, > 1 repeats (whole passes,
    then a seeded sample of the remainder). Default: every row once."""
    max_rows: Annotated[int, Field(ge=1, le=2**40)] | None = None
    """Caps the rows selected from this source (after fraction)."""
    optional: bool = False
    """True: a source that yields no rows is allowed (counted as 0); otherwise the stage fails
    naming it."""
    max_rejected_fraction: Fraction | None = None
    """This source's share of rejected rows above which preprocessing fails; default
    data.maxRejectedFraction."""
    config: Identifier | None = None
    """Hub datasets only: the dataset's config (subset)."""
    split: Identifier | None = None
    """Hub datasets only: the dataset's split."""
    files: Annotated[list[HubFileGlob], Field(max_length=MAX_EXCLUDES)] | None = None
    """Hub datasets only: globs of repository files to read (Parquet, JSON Lines)."""


Sources = Annotated[list[Source], Field(min_length=1, max_length=MAX_SOURCES)]


class Packing(_Model):
    """How documents share a packed block."""

    cross_document_attention: bool = True
    """Let tokens attend across document boundaries inside a block; false restarts position_ids
    (and attention) at every document."""


class DataSpec(_Model):
    """Training data: files, their format and how they are packed into blocks."""

    format: DataFormat
    """text: documents; chat: conversations (messages with roles); preference: prompt/chosen/rejected."""
    train: DataUris | None = None
    """A list of files, prefixes (s3://bucket/dir/) or globs (s3://bucket/dir/*.jsonl): .jsonl,
    .json, .txt, .parquet, optionally .gz or .zst. Exactly one of train and sources."""
    sources: Sources | None = None
    """Training sources, each with its own terms (exclude, fraction, maxRows, optional,
    maxRejectedFraction). Exactly one of train and sources."""
    validation: DataUris | None = None
    """Validation files (same forms); when absent, validationFraction of the training rows is held out."""
    validation_sources: Sources | None = None
    """Validation sources with their own terms; exclusive with validation and validationFraction."""
    validation_fraction: Fraction = 0.0
    """Share of training documents held out for validation when no validation files are given."""
    text_field: Identifier = "text"
    """JSON/Parquet field holding the document (format text)."""
    messages_field: Identifier = "messages"
    """Field holding the list of {role, content} messages (format chat)."""
    prompt_field: Identifier = "prompt"
    """Prompt field (format preference)."""
    chosen_field: Identifier = "chosen"
    """Preferred answer field (format preference)."""
    rejected_field: Identifier = "rejected"
    """Dispreferred answer field (format preference)."""
    text_split: Literal["paragraph", "line"] = "paragraph"
    """How .txt files split into documents: blank-line-separated paragraphs (or documentSeparator
    lines) or single lines."""
    document_separator: Annotated[str, Field(max_length=256, pattern=SEPARATOR_PATTERN)] | None = (
        None
    )
    """A line that separates the documents of .txt files (e.g. <|endoftext|> in TinyStoriesV2).
    Default: blank lines."""
    packing: Packing = Field(default_factory=Packing)
    """Packing of documents into blocks."""
    chat_template: Literal["chatml", "tulu", "llama3"] | None = None
    """A named chat template; default: the tokenizer's own (chat and preference formats)."""
    block_size: int = Field(default=1024, ge=1, le=1_048_576)
    """Tokens per packed training sequence; must not exceed the model's context length."""
    partial_block: Literal["pad", "drop"] = "pad"
    """The final partial block of text data: padded (masked out of the loss) or dropped; counted either way."""
    max_rejected_fraction: Fraction = 0.01
    """Fail preprocessing when more than this share of rows is rejected; rejected rows are always counted."""

    def all_sources(self) -> list[tuple[str, Source, str]]:
        """(split, source, the field its URI is in) of every input: data.train[i] is the source
        `train-<i>`, data.validation[i] is `validation-<i>`, with no terms; sources as written."""
        plain = [
            ("train", "train", self.train or []),
            ("validation", "validation", self.validation or []),
        ]
        named = [
            ("train", "sources", self.sources or []),
            ("validation", "validationSources", self.validation_sources or []),
        ]
        found = [
            (split, Source(name=f"{split}-{i}", uri=uri), f"spec.data.{field}[{i}]")
            for split, field, uris in plain
            for i, uri in enumerate(uris)
        ]
        found += [
            (split, source, f"spec.data.{field}[{i}].uri")
            for split, field, sources in named
            for i, source in enumerate(sources)
        ]
        return found

    def uris(self) -> list[str]:
        """Every data URI, train and validation."""
        return [source.uri for _, source, _ in self.all_sources()]


# --------------------------------------------------------------------------------------------- method

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class Adapter(_Model):
    """Parameter-efficient fine-tuning through PEFT."""

    type: Literal["none", "lora", "qlora"] = "none"
    """none: full fine-tune; lora: LoRA on a 16/32-bit base; qlora: LoRA on a 4-bit (NF4) base."""
    r: int = Field(default=16, ge=1, le=4096)
    """LoRA rank."""
    alpha: float = Field(default=32.0, gt=0)
    """LoRA scaling (alpha / r)."""
    dropout: Fraction = 0.05
    """Dropout on the LoRA path."""
    target_modules: list[Identifier] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1, max_length=64
    )
    """Module names to adapt."""


class DPOSettings(_Model):
    """Direct Preference Optimization (TRL DPOTrainer)."""

    beta: float = Field(default=0.1, gt=0, le=10)
    """Strength of the KL penalty towards the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO loss variant."""
    max_prompt_length: PositiveInt | None = None
    """Longest prompt kept (tokens); pairs longer than data.blockSize in total are dropped and counted."""
    precompute_reference_log_probs: bool = False
    """Compute the reference model's log-probabilities of every pair once, before training, and
    free the reference model (TRL's precompute_ref_log_probs): a full DPO run then holds one model,
    not two, at the cost of one inference pass over the data."""


class MethodSpec(_Model):
    """What kind of training: the objective and the adapter."""

    stage: Method
    """pretrain (next-token on text), sft (supervised: text or chat), dpo (preference data)."""
    adapter: Adapter = Field(default_factory=Adapter)
    """Adapter settings; type none trains every weight."""
    dpo: DPOSettings | None = None
    """DPO settings (stage dpo only); default: DPOSettings' defaults."""


# ------------------------------------------------------------------------------------------- training


class TrainingSpec(_Model):
    """Optimisation hyper-parameters."""

    epochs: float | None = Field(default=None, gt=0, le=10_000)
    """Passes over the training data; exclusive with maxSteps. Default: 1 epoch."""
    max_steps: PositiveInt | None = Field(default=None, le=MAX_STEPS)
    """Optimizer steps to run; exclusive with epochs."""
    learning_rate: float = Field(default=2.0e-4, gt=0, le=1)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Fraction = 0.03
    """Share of steps spent warming up linearly."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """AdamW weight decay."""
    micro_batch_size: int = Field(default=1, ge=1, le=65536)
    """Sequences per process per forward pass."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=65536)
    """Micro-batches per optimizer step."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Compute precision; optimizer state stays fp32."""
    optimizer: Optimizer = "adamw_torch"
    """Optimizer; the *_8bit ones come from bitsandbytes."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    weight_precision: Literal["fp32", "bf16"] = "fp32"
    """The dtype a full fine-tune loads its weights in. fp32: the weights are the optimizer's
    master copy (16 bytes per parameter with AdamW). bf16 (seed 003, open-instruct): half the
    memory; under DeepSpeed ZeRO the fp32 master copy lives in DeepSpeed's optimizer anyway, but
    without DeepSpeed the optimizer updates bf16 weights directly, and updates smaller than about
    1/256 of a weight round away (fine for a sanity rung, lossy at small learning rates). Needs
    precision bf16. Adapters ignore it: their frozen base loads in training.precision (qlora: 4
    bits)."""
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel: sdpa (PyTorch's fused kernels), eager (materialises the heads × block²
    scores: memory grows with the square of blockSize), flash_attention_2 (needs GPUs, 16-bit
    precision and the flash-attn package in the trainer image)."""
    compile: bool = False
    """torch.compile the model (seed 002: 20–30% faster steps after a compilation of minutes)."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Seed for weights, data order and dropout."""
    logging_steps: int = Field(default=10, ge=1, le=MAX_STEPS)
    """Log (and update metrics) every this many optimizer steps."""
    eval_steps: PositiveInt | None = Field(default=None, le=MAX_STEPS)
    """Evaluate on the validation split every this many steps (default: at the end only)."""
    max_grad_norm_abort: float = Field(default=1.0e6, gt=0)
    """Abort (exit 3) when the gradient norm exceeds this: the run is diverging."""


class CheckpointSpec(_Model):
    """Checkpoints: every everySteps and on SIGTERM; a checkpoint counts only once complete."""

    every_steps: int = Field(default=500, ge=1, le=MAX_STEPS)
    """Save every this many optimizer steps."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Newest complete checkpoints kept."""


class Toleration(_Model):
    """A pod toleration (see the Kubernetes Toleration type)."""

    key: str | None = Field(default=None, max_length=316, pattern=LABEL_KEY_PATTERN)
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists or Equal."""
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class StageResources(_Model):
    """CPU and memory of a one-pod stage (preprocessing never gets a GPU)."""

    cpu: Quantity = "4"
    """CPU request and limit, e.g. 8 or "500m"."""
    memory: Quantity = "16Gi"
    """Memory request and limit, e.g. 16Gi."""


class MergeResources(_Model):
    """Compute of the merge/evaluation Job."""

    cpu: Quantity = "4"
    """CPU request and limit."""
    memory: Quantity = "64Gi"
    """Memory request and limit: the merge loads the full-precision base."""
    gpus: int | None = Field(default=None, ge=0, le=1)
    """GPUs for evaluation (0 or 1). Default: 1 when the run trains on GPUs, else 0. With 0 the
    merge and the perplexity evaluation run on CPU."""


class ResourcesSpec(_Model):
    """Compute per stage (changes take effect at the next attempt)."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Training pods (machines); one Master plus nodes-1 Workers."""
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """GPUs (= processes) per training node; 0 trains on CPU with gloo (tests and tiny runs)."""
    gpu_resource: Annotated[str, Field(max_length=253, pattern=r"^[a-z0-9.\-]+/[a-z0-9.\-]+$")] = (
        "nvidia.com/gpu"
    )
    """Extended resource name of the GPU."""
    gpu_memory: Quantity | None = None
    """Memory of one GPU (e.g. 80Gi): every stage and rung is checked to fit it before anything
    runs. Default: from nodeSelector's GPU Feature Discovery labels (nvidia.com/gpu.memory,
    nvidia.com/gpu.product), else the cluster's default; without any, no fit check."""
    cpu: Quantity | None = None
    """CPU request and limit per training pod (sanity and train), e.g. 8."""
    memory: Quantity | None = None
    """Memory request and limit per training pod (sanity and train), e.g. 48Gi."""
    shared_memory: Quantity = "8Gi"
    """Size of the in-memory /dev/shm volume of training pods (NCCL and data loaders need more
    than the 64M default)."""
    preprocess: StageResources = Field(default_factory=StageResources)
    """CPU and memory of the preprocessing Job; it never requests a GPU."""
    merge: MergeResources = Field(default_factory=MergeResources)
    """CPU, memory and GPU of the merge/evaluation Job."""
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = (
        Field(default_factory=dict)
    )
    """Node labels the training pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations for tainted GPU nodes."""

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if len(key) > 316 or not re.fullmatch(LABEL_KEY_PATTERN, key):
                raise ValueError(
                    f"{key!r} is not a Kubernetes label key — use e.g. "
                    "nvidia.com/gpu.product or node-type"
                )
        return value

    @property
    def world_size(self) -> int:
        """Training processes: one per GPU, or one per node on CPU."""
        return self.nodes * max(self.gpus_per_node, 1)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def merge_gpus(self) -> int:
        """GPUs of the merge Job: resources.merge.gpus, else 1 on GPU runs."""
        if self.merge.gpus is not None:
            return self.merge.gpus
        return min(self.gpus_per_node, 1)


class DistributedSpec(_Model):
    """Data parallelism: plain DDP or DeepSpeed ZeRO."""

    zero_stage: int = Field(default=0, ge=0, le=3)
    """0: DDP (or one process); 1–3: DeepSpeed ZeRO stage (3 shards parameters too)."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (and parameters at stage 3) to CPU memory."""


class SanityRung(_Model):
    """One short gate run; unset fields take the defaults below or the run's own settings."""

    gpus: int | None = Field(default=None, ge=0, le=1024)
    """GPUs (= processes) of the rung: at most one node's, or whole nodes. Default: 1 (0 on CPU
    runs). 0 runs one CPU process."""
    steps: int | None = Field(default=None, ge=2, le=100_000)
    """Optimizer steps of the rung. Default: 100."""
    min_loss_drop: Fraction | None = None
    """Required relative drop of the loss from the first to the last logged steps. Default: 0.1."""
    max_grad_norm: float | None = Field(default=None, gt=0)
    """Gradient norms above this fail the rung. Default: 1000."""
    zero_stage: int | None = Field(default=None, ge=0, le=3)
    """ZeRO stage of this rung (0: no DeepSpeed). Default: distributed.zeroStage."""
    optimizer: Optimizer | None = None
    """Optimizer of this rung. Default: training.optimizer."""
    micro_batch_size: int | None = Field(default=None, ge=1, le=65536)
    """Sequences per process per forward pass on this rung. Default: training.microBatchSize."""
    offload: Literal["none", "cpu"] | None = None
    """DeepSpeed CPU offload of this rung (needs its zeroStage 2 or 3): a narrow rung of a large
    model fits with the optimizer state in RAM. Default: distributed.offload."""


#: The defaults of a rung's own criteria (one place: the docstrings above say the same).
RUNG_DEFAULTS = {"steps": 100, "min_loss_drop": 0.10, "max_grad_norm": 1000.0}


class SanitySpec(SanityRung):
    """Gates before the full run, in order: either one gate (the fields here) or a ladder of
    rungs (seed 003: 1 GPU without DeepSpeed, then 2 with ZeRO-3, then 8). Each rung must pass
    (loss falls, nothing NaN, gradients sane) before the next starts; the full run starts after
    the last."""

    rungs: list[SanityRung] | None = Field(default=None, min_length=1, max_length=8)
    """The ladder, in order; exclusive with the single-gate fields."""

    @staticmethod
    def gate_fields() -> tuple[str, ...]:
        return tuple(SanityRung.model_fields)

    @property
    def ladder(self) -> tuple[SanityRung, ...]:
        """The rungs as written: `rungs`, or the single gate as a one-rung ladder."""
        if self.rungs is not None:
            return tuple(self.rungs)
        return (SanityRung.model_validate(self.model_dump(exclude={"rungs"}, exclude_none=True)),)


class OutputSpec(_Model):
    """Where the run writes checkpoints, the final model, metrics and the model card."""

    uri: Uri
    """Output location: s3://bucket/prefix/, pvc://CLAIM/path or a local path (local runs)."""
    merge: bool = False
    """Merge the adapter into the full-precision base and export merged/ (adapter runs only)."""
    max_perplexity: float | None = Field(default=None, gt=0)
    """Fail the merge stage (exit 3) when the validation perplexity exceeds this."""


class S3Spec(_Model):
    """S3 (or MinIO and friends) settings; credentials by reference only."""

    secret_name: ObjectName | None = None
    """Secret with the keys below; its values reach pods only through secretKeyRef."""
    access_key_id_key: Identifier = "AWS_ACCESS_KEY_ID"
    """Key of the access key id in the Secret."""
    secret_access_key_key: Identifier = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a key name)
    """Key of the secret access key in the Secret."""
    endpoint: Endpoint = ""
    """Endpoint URL for S3-compatible stores (MinIO, Ceph): https://…, or http://… with
    allowInsecureEndpoint; empty for AWS. Instance-metadata addresses are refused."""
    allow_insecure_endpoint: bool = False
    """Allow a plain http:// endpoint (a test store on a trusted network)."""
    region: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9\-]*$")] = ""
    """Region; empty lets boto3 decide."""


class HFSpec(_Model):
    """The Hugging Face Hub, for hf:// models and tokenizers; the token by reference only."""

    secret_name: ObjectName | None = None
    """Secret holding the Hub token (gated and private repositories)."""
    token_key: Identifier = "HF_TOKEN"  # noqa: S105 (a key name)
    """Key of the token in the Secret."""
    endpoint: Endpoint = ""
    """Hub endpoint (a mirror), https://…; empty for huggingface.co."""


class StorageSpec(_Model):
    """Object storage, the Hub, and the shared dataset cache."""

    s3: S3Spec = Field(default_factory=S3Spec)
    """S3 settings for every s3:// URI of the run."""
    hf: HFSpec = Field(default_factory=HFSpec)
    """Hub settings for hf:// models and tokenizers."""
    cache_root: Uri | None = None
    """Where tokenized datasets are cached by content key (share it across runs); default <output.uri>/cache."""


class TrainingRunSpec(_Model):
    """A declarative training run: data → tokenized blocks → (sanity) → training → merge/eval."""

    model: ModelSpec
    """The starting weights (immutable)."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    """The tokenizer (immutable)."""
    data: DataSpec
    """Training and validation data (immutable)."""
    method: MethodSpec
    """Objective and adapter (immutable)."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Hyper-parameters (immutable)."""
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoint cadence and retention."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Nodes, GPUs and memory per stage (mutable: applies at the next attempt)."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """DDP or DeepSpeed ZeRO (immutable)."""
    sanity: SanitySpec | None = None
    """Optional gates before the full run: one, or a ladder of rungs (mutable until it ran)."""
    output: OutputSpec
    """Where results go."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Object storage and Hub credentials, and the dataset cache."""
    image: ImageReference | None = None
    """Trainer image; default: the operator's configured trainer image."""
    max_restarts: int = Field(default=3, ge=0, le=100)
    """Training attempts restarted after retryable failures or stalls."""
    stall_timeout: Annotated[str, Field(pattern=DURATION_PATTERN, min_length=2, max_length=32)] = (
        "15m"
    )
    """No progress for this long: training restarts the attempt, preprocessing fails the run (e.g. 15m, 1h30m)."""
    stage_deadline: Annotated[str, Field(pattern=DURATION_PATTERN, min_length=2, max_length=32)] = (
        "24h"
    )
    """Longest the preprocess and merge Jobs may run (their activeDeadlineSeconds): a backstop for
    a stage that never ends; past it the run fails. Raise it for corpora that take longer."""
    queue_name: Annotated[str, Field(max_length=63, pattern=DNS1123_SUBDOMAIN)] | None = None
    """Kueue LocalQueue; sets kueue.x-k8s.io/queue-name on the jobs."""
    suspend: bool = False
    """Pause: running jobs are stopped after a checkpoint; resume by setting false."""

    def uses_hub(self) -> bool:
        """True when a model, tokenizer or data source comes from the Hugging Face Hub (hf://)."""
        uris = (self.model.uri, self.tokenizer.uri, *self.data.uris())
        return any(u is not None and u.startswith("hf://") for u in uris)


class ObjectMeta(BaseModel):
    """The parts of metadata kubetrain reads; the rest passes through (the name's rules are in
    rules.py, with the others)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class TrainingRun(BaseModel):
    """The whole custom resource."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    apiVersion: Literal["kubetrain.dev/v1alpha1"]
    kind: Literal["TrainingRun"]
    metadata: ObjectMeta
    spec: TrainingRunSpec
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @model_validator(mode="after")
    def _rules(self) -> TrainingRun:
        found = rules.problems(self)
        if found:
            raise SpecErrors([SpecError(path, message) for path, message in found])
        return self


def _loc(loc: tuple[int | str, ...], prefix: str) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(to_camel(item) if "_" in item else item)
    return ".".join(p for p in [prefix, *parts] if p)


def problems_from(error: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into `path: problem — fix` lines with camelCase paths."""
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in error.errors(include_url=False):
        ctx_error = (err.get("ctx") or {}).get("error")
        base = _loc(tuple(err["loc"]), "")
        if isinstance(ctx_error, SpecError):
            found = ctx_error.errors if isinstance(ctx_error, SpecErrors) else [ctx_error]
            lines = [
                (_join(base, e.path), e.problem + (f" — {e.fix}" if e.fix else "")) for e in found
            ]
        else:
            lines = [(base, _friendly(err))]
        for path, message in lines:
            if (path, message) not in seen:
                seen.add((path, message))
                problems.append(Problem(path or "(root)", message))
    return problems


def _join(base: str, path: str) -> str:
    """A rule's own path is relative to the model it sits on, unless it starts at spec."""
    if path.startswith("spec.") or not base:
        return path or base
    return f"{base}.{path}" if path else base


PATTERN_HINTS = {
    DURATION_PATTERN: "a duration such as 15m, 1h30m or 90s",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 48Gi, 512Mi or 8",
    DNS1035: "a DNS-1035 label: lower-case letters, digits and '-', starting with a letter",
    DNS1123_SUBDOMAIN: "a lower-case DNS name: letters, digits, '-' and '.'",
    URI_PATTERN: "a URI without spaces or control characters",
    IDENTIFIER_PATTERN: "a field name: letters, digits, '_', '.' and '-'",
    LABEL_VALUE_PATTERN: "a label value: letters, digits, '-', '_' and '.', at most 63",
    LABEL_KEY_PATTERN: "a label key such as example.com/gpu-type",
    ENDPOINT_PATTERN: "an http(s) URL: host, port and path, no user:password@ (credentials go "
    "in the Secret)",
}


def _friendly(err: Any) -> str:
    """pydantic's message plus what to do, for the error kinds users hit."""
    kind, msg, ctx = err["type"], err["msg"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown field — remove it or check its spelling against `kubectl explain trainingrun.spec`"
    if kind == "missing":
        return "is required — add it"
    if kind == "literal_error":
        return f"{msg} — use one of the listed values"
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(str(ctx.get("pattern")), f"a value matching {ctx.get('pattern')}")
        return f"has characters or a shape that is not allowed — write {hint}"
    if kind == "value_error":
        return str(msg).removeprefix("Value error, ")
    bound = {
        "greater_than_equal": ("ge", "a value ≥ {}"),
        "greater_than": ("gt", "a value > {}"),
        "less_than_equal": ("le", "a value ≤ {}"),
        "less_than": ("lt", "a value < {}"),
        "string_too_short": ("min_length", "at least {} characters"),
        "string_too_long": ("max_length", "at most {} characters"),
        "too_short": ("min_length", "at least {} items"),
        "too_long": ("max_length", "at most {} items"),
    }.get(kind)
    if bound is not None and bound[0] in ctx:
        return f"{msg} — use {bound[1].format(ctx[bound[0]])}"
    expected = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "float_type": "a number",
        "float_parsing": "a number",
        "finite_number": "a finite number (not .inf or .nan)",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping of fields",
        "model_attributes_type": "a mapping of fields",
    }.get(kind)
    if expected is not None:
        return f"{msg} — write {expected}"
    return f"{msg} — fix the value"


def parse_run(document: Any) -> TrainingRun:
    """Validate a TrainingRun document; raises :class:`InvalidRun` with every problem.

    Field errors stop pydantic before the rules run, so on a field error the rules are evaluated
    here on the sections that did parse: one pass reports both kinds.
    """
    try:
        return TrainingRun.model_validate(document)
    except ValidationError as error:
        problems = problems_from(error)
        if not any(_is_rule_error(e) for e in error.errors(include_url=False)):
            seen = {(p.path, p.message) for p in problems}
            for path, message in _rules_on_valid_sections(document):
                if (path, message) not in seen:
                    problems.append(Problem(path, message))
        raise InvalidRun(problems) from None


def _is_rule_error(err: Any) -> bool:
    return isinstance((err.get("ctx") or {}).get("error"), SpecError)


@functools.cache
def _section_adapter(name: str) -> TypeAdapter[Any]:
    info = TrainingRunSpec.model_fields[name]
    annotation: Any = info.annotation
    return TypeAdapter(Annotated[annotation, *info.metadata] if info.metadata else annotation)


def _rules_on_valid_sections(document: Any) -> list[tuple[str, str]]:
    """The rules over whatever parses of a document that has field errors elsewhere."""
    if not isinstance(document, dict) or not isinstance(document.get("spec"), dict):
        return []
    raw, valid, sections = document["spec"], set(), {}
    for name, info in TrainingRunSpec.model_fields.items():
        wire = info.alias or name
        try:
            if wire in raw:
                value = _section_adapter(name).validate_python(raw[wire])
            elif not info.is_required():
                value = info.get_default(call_default_factory=True)
            else:
                continue
        except ValidationError:
            continue
        sections[name] = value
        valid.add(wire)
    metadata = document.get("metadata")
    meta = None
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
        meta = ObjectMeta.model_validate({"name": metadata["name"]})
        valid.add("metadata")
    root = SimpleNamespace(metadata=meta, spec=TrainingRunSpec.model_construct(**sections))
    return rules.problems(root, frozenset(valid))


class InvalidRun(ValueError):
    """Every problem found in one TrainingRun."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))
