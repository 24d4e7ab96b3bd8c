"""The TrainingRun API (`kubetrain.dev/v1alpha1`): parse, default and validate a run — pure.

One source of truth: the CRD (`crd.py`) is generated from these models, `kubetrain validate` and the
operator's admission both call :func:`parse_run`. Field docstrings become the CRD's descriptions, so
`kubectl explain trainingrun.spec.…` shows them. Every rule raises a :class:`SpecError` that names the
field path and says what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_GROUP = "kubetrain.dev"
API_VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"

#: Child names append suffixes such as `-preprocess-1a2b3c4d`; 50 leaves room under 63.
MAX_NAME_LENGTH = 50
DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: A URI: no whitespace or control characters; the scheme is checked by :func:`check_uri`.
URI_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
URI_SCHEMES = ("s3", "pvc", "hf", "file")
DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
#: An http(s) endpoint without user:password@ — credentials belong in the Secret, never in a spec.
ENDPOINT_PATTERN = r"^(https?://[^\s@/]+(/[^\s@]*)?)?$"
#: Kubernetes label values (also node selector and toleration values): at most 63 characters.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: Kubernetes label keys (qualified names): an optional DNS-1123 prefix and a name of at most 63.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
#: Byte-level BPE needs the 256-byte alphabet; below 512 there is no room for merges.
MIN_TRAINED_VOCAB = 512


def check_uri(value: str) -> str:
    """Refuse schemes outside the allowlist; a bare path is a local path (local runs)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", value)
    if match is None:
        return value
    scheme, rest = match.group(1), match.group(2)
    if scheme not in URI_SCHEMES:
        raise ValueError(
            f"scheme {scheme!r} is not supported — use one of "
            f"{', '.join(s + '://' for s in URI_SCHEMES)} or a local path"
        )
    if scheme in ("s3", "pvc", "hf") and not re.match(r"^[A-Za-z0-9][^/]*(/.*)?$", rest):
        raise ValueError(
            f"{scheme}:// needs a bucket, claim or repository after the scheme — "
            f"write {scheme}://NAME/path"
        )
    if scheme == "pvc" and not re.match(DNS1123_SUBDOMAIN, rest.split("/", 1)[0]):
        raise ValueError(
            "pvc://CLAIM/path needs a PersistentVolumeClaim name (DNS-1123) — "
            "use the claim's name, e.g. pvc://datasets/path"
        )
    return value


Uri = Annotated[
    str, Field(min_length=1, max_length=2048, pattern=URI_PATTERN), AfterValidator(check_uri)
]
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class SpecError(ValueError):
    """A problem in a TrainingRun: the field path, what is wrong, and what to do."""

    def __init__(self, path: str, problem: str, fix: str = "") -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" + (f" — {self.fix}" if self.fix else "")


class SpecErrors(ValueError):
    """Several cross-field problems found together, so the user sees all of them at once."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        super().__init__("; ".join(map(str, errors)))


@dataclass(frozen=True)
class Problem:
    """One validation problem, as `kubetrain validate` prints it and the operator reports it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class _Model(BaseModel):
    """camelCase on the wire, unknown fields refused, field docstrings kept as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
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

    @model_validator(mode="after")
    def _shape(self) -> Architecture:
        if self.hidden_size % self.heads:
            raise SpecError(
                "heads",
                f"{self.heads} does not divide hiddenSize {self.hidden_size}",
                "choose heads so that hiddenSize / heads is an integer",
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise SpecError(
                "kvHeads", f"{self.kv_heads} does not divide heads {self.heads}", "use a divisor"
            )
        return self


class ModelSpec(_Model):
    """Where the weights come from: exactly one of uri, architecture and fromRun."""

    uri: Uri | None = None
    """A pretrained model directory: s3://…, pvc://CLAIM/path, hf://org/name, or a local path."""
    architecture: Architecture | None = None
    """Build a new model with random weights (pretraining from scratch)."""
    from_run: Annotated[str, Field(max_length=MAX_NAME_LENGTH, pattern=DNS1035)] | None = None
    """Name of a TrainingRun in the same namespace whose output model this run starts from."""
    quantized: bool = False
    """Declare that the base at uri is already quantized (e.g. a bnb-4bit export): merging into it is refused."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [n for n, v in self._sources().items() if v is not None]
        if len(given) != 1:
            raise SpecError(
                "",
                f"exactly one of uri, architecture, fromRun is required, got "
                f"{', '.join(given) or 'none'}",
                "keep one: uri for a pretrained model, architecture to build one, fromRun to chain",
            )
        return self

    def _sources(self) -> dict[str, object]:
        return {"uri": self.uri, "architecture": self.architecture, "fromRun": self.from_run}


class TokenizerTraining(_Model):
    """Train a byte-level BPE tokenizer on data.train with `tokenizers`; saved with the dataset."""

    vocab_size: int = Field(ge=MIN_TRAINED_VOCAB, le=1_048_576)
    """Vocabulary size including the special tokens; it becomes the model's vocabulary size."""
    special_tokens: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["<|endoftext|>"], max_length=64
    )
    """Special tokens; the first is the end-of-document (EOS) token."""
    min_frequency: PositiveInt = 2
    """Merges that occur fewer times are not learned."""

    # vocabSize ≥ 512 always leaves room for the 256 bytes and the ≤ 64 special tokens.
    @model_validator(mode="after")
    def _distinct(self) -> TokenizerTraining:
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise SpecError("specialTokens", "contains duplicates", "list each token once")
        return self


class TokenizerSpec(_Model):
    """The tokenizer: trained here, loaded from uri, or (when absent) the model's own."""

    uri: Uri | None = None
    """A tokenizer directory (tokenizer.json and friends); default: the model's directory."""
    train: TokenizerTraining | None = None
    """Train a BPE tokenizer on the training data (pretraining from scratch only)."""

    @model_validator(mode="after")
    def _one(self) -> TokenizerSpec:
        if self.uri is not None and self.train is not None:
            raise SpecError("", "uri and train are mutually exclusive", "keep one of them")
        return self


# ----------------------------------------------------------------------------------------------- data


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


#: One URI or a list on the wire; always a list once parsed. The CRD accepts both (see crd.py).
Uris = Annotated[
    list[Uri],
    Field(min_length=1, max_length=4096, json_schema_extra={"x-kubetrain-one-or-many": True}),
    BeforeValidator(_as_list),
]


class DataSpec(_Model):
    """Training data: files, their format and how they are packed into blocks."""

    format: Literal["text", "chat", "preference"]
    """text: documents; chat: conversations (messages with roles); preference: prompt/chosen/rejected."""
    train: Uris
    """One URI or a list: .jsonl, .json, .txt, .parquet, optionally .gz or .zst."""
    validation: Uris | None = None
    """Validation files; when absent, validationFraction of the training rows is held out."""
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
    """How .txt files split into documents: blank-line-separated paragraphs or single lines."""
    chat_template: Literal["chatml", "tulu", "llama3"] | None = None
    """A named chat template; default: the tokenizer's own (chat and preference formats)."""
    block_size: int = Field(default=1024, ge=1, le=1_048_576)
    """Tokens per packed training sequence; must not exceed the model's context length."""
    partial_block: Literal["pad", "drop"] = "pad"
    """The final partial block of text data: padded (masked out of the loss) or dropped; counted either way."""
    max_rejected_fraction: Fraction = 0.01
    """Fail preprocessing when more than this share of rows is rejected; rejected rows are always counted."""

    @field_validator("train", "validation")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a URI twice — list each file once")
        return value

    @model_validator(mode="after")
    def _validation_source(self) -> DataSpec:
        if self.validation is not None and self.validation_fraction > 0:
            raise SpecError(
                "validationFraction",
                "is set together with validation files",
                "keep validation or validationFraction, not both",
            )
        if self.validation_fraction >= 1:
            raise SpecError("validationFraction", "must be below 1", "use e.g. 0.01")
        if self.chat_template is not None and self.format == "text":
            raise SpecError("chatTemplate", "applies to chat and preference data only", "remove it")
        return self


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


class MethodSpec(_Model):
    """What kind of training: the objective and the adapter."""

    stage: Literal["pretrain", "sft", "dpo"]
    """pretrain (next-token on text), sft (supervised: text or chat), dpo (preference data)."""
    adapter: Adapter = Field(default_factory=Adapter)
    """Adapter settings; type none trains every weight."""
    dpo: DPOSettings | None = None
    """DPO settings (stage dpo only)."""

    @model_validator(mode="after")
    def _dpo(self) -> MethodSpec:
        if self.dpo is not None and self.stage != "dpo":
            raise SpecError(
                "dpo", f"is set but stage is {self.stage}", "remove it or use stage: dpo"
            )
        return self


# ------------------------------------------------------------------------------------------- training

EIGHT_BIT_SUFFIX = "_8bit"


class TrainingSpec(_Model):
    """Optimisation hyper-parameters."""

    epochs: float | None = Field(default=None, gt=0, le=10_000)
    """Passes over the training data; exclusive with maxSteps. Default: 1 epoch."""
    max_steps: PositiveInt | None = None
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
    optimizer: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adafactor",
        "sgd",
        "adamw_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
    ] = "adamw_torch"
    """Optimizer; the *_8bit ones come from bitsandbytes."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Seed for weights, data order and dropout."""
    logging_steps: int = Field(default=10, ge=1)
    """Log (and update metrics) every this many optimizer steps."""
    eval_steps: PositiveInt | None = None
    """Evaluate on the validation split every this many steps (default: at the end only)."""
    max_grad_norm_abort: float = Field(default=1.0e6, gt=0)
    """Abort (exit 3) when the gradient norm exceeds this: the run is diverging."""

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise SpecError("epochs", "is set together with maxSteps", "keep one of them")
        return self


class CheckpointSpec(_Model):
    """Checkpoints: every everySteps and on SIGTERM; a checkpoint counts only once complete."""

    every_steps: int = Field(default=500, ge=1)
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


class ResourcesSpec(_Model):
    """Compute for the training job (changes take effect at the next attempt)."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Pods (machines); one Master plus nodes-1 Workers."""
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """GPUs (= processes) per node; 0 trains on CPU with gloo (tests and tiny runs)."""
    gpu_resource: Annotated[str, Field(pattern=r"^[a-z0-9.\-]+/[a-z0-9.\-]+$")] = "nvidia.com/gpu"
    """Extended resource name of the GPU."""
    cpu: Annotated[str, Field(pattern=QUANTITY_PATTERN)] | None = None
    """CPU request and limit per pod, e.g. "8"."""
    memory: Annotated[str, Field(pattern=QUANTITY_PATTERN)] | None = None
    """Memory request and limit per pod, e.g. 48Gi."""
    shared_memory: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = "8Gi"
    """Size of the in-memory /dev/shm volume (NCCL and data loaders need more than the 64M default)."""
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
            if len(key) > 316 or not re.match(LABEL_KEY_PATTERN, key):
                raise ValueError(
                    f"{key!r} is not a Kubernetes label key — use e.g. "
                    "nvidia.com/gpu.product or node-type"
                )
        return value

    @property
    def world_size(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class DistributedSpec(_Model):
    """Data parallelism: plain DDP or DeepSpeed ZeRO."""

    zero_stage: int = Field(default=0, ge=0, le=3)
    """0: DDP (or one process); 1–3: DeepSpeed ZeRO stage (3 shards parameters too)."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (and parameters at stage 3) to CPU memory."""

    @model_validator(mode="after")
    def _offload(self) -> DistributedSpec:
        if self.offload != "none" and self.zero_stage < 2:
            raise SpecError(
                "offload", f"needs zeroStage 2 or 3, got {self.zero_stage}", "set zeroStage: 2 or 3"
            )
        return self


class SanitySpec(_Model):
    """A short gate run before the full job: loss must fall and gradients stay sane."""

    steps: int = Field(default=100, ge=2, le=100_000)
    """Optimizer steps of the gate run."""
    gpus: int | None = Field(default=None, ge=0, le=1024)
    """GPUs of the gate run (default: 1, or 0 for CPU runs); at most the run's GPUs."""
    min_loss_drop: Fraction = 0.10
    """Required relative drop of the loss from the first to the last logged steps."""
    max_grad_norm: float = Field(default=1000.0, gt=0)
    """Gradient norms above this fail the gate."""


class OutputSpec(_Model):
    """Where the run writes checkpoints, the final model, metrics and the model card."""

    uri: Uri
    """Output location: s3://bucket/prefix/, pvc://CLAIM/path or a local path (local runs)."""
    merge: bool = False
    """Merge the adapter into the full-precision base and export merged/ (adapter runs only)."""


class S3Spec(_Model):
    """S3 (or MinIO and friends) credentials, by reference only."""

    secret_name: Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] | None = None
    """Secret with the keys below; its values reach pods only through secretKeyRef."""
    access_key_id_key: Identifier = "AWS_ACCESS_KEY_ID"
    """Key of the access key id in the Secret."""
    secret_access_key_key: Identifier = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 (a key name)
    """Key of the secret access key in the Secret."""
    endpoint: Annotated[str, Field(max_length=2048, pattern=ENDPOINT_PATTERN)] = ""
    """Endpoint URL for S3-compatible stores (MinIO, Ceph); empty for AWS."""
    region: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9\-]*$")] = ""
    """Region; empty lets boto3 decide."""


class StorageSpec(_Model):
    """Object storage and the shared dataset cache."""

    s3: S3Spec = Field(default_factory=S3Spec)
    """S3 settings for every s3:// URI of the run."""
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
    """Nodes, GPUs and memory (mutable: applies at the next attempt)."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """DDP or DeepSpeed ZeRO (immutable)."""
    sanity: SanitySpec | None = None
    """Optional gate before the full run (mutable until it ran)."""
    output: OutputSpec
    """Where results go."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Object storage credentials and the dataset cache."""
    image: (
        Annotated[str, Field(max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@\-]*$")] | None
    ) = None
    """Trainer image; default: the operator's configured trainer image."""
    max_restarts: int = Field(default=3, ge=0, le=100)
    """Training attempts restarted after retryable failures or stalls."""
    stall_timeout: Annotated[str, Field(pattern=DURATION_PATTERN, min_length=2)] = "15m"
    """No step progress for this long restarts the attempt (e.g. 15m, 1h30m)."""
    queue_name: Annotated[str, Field(max_length=63, pattern=DNS1123_SUBDOMAIN)] | None = None
    """Kueue LocalQueue; sets kueue.x-k8s.io/queue-name on the jobs."""
    suspend: bool = False
    """Pause: running jobs are stopped after a checkpoint; resume by setting false."""

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingRunSpec:
        problems = cross_field_problems(self)
        if problems:
            raise SpecErrors(problems)
        return self


def _stage_formats() -> dict[str, tuple[str, ...]]:
    return {"pretrain": ("text",), "sft": ("text", "chat"), "dpo": ("preference",)}


STAGE_FORMATS = _stage_formats()


def cross_field_problems(spec: TrainingRunSpec) -> list[SpecError]:
    """Rules that span sections. Kept as data so the CRD's CEL rules and the docs can mirror them."""
    problems: list[SpecError] = []
    arch, tok, method = spec.model.architecture, spec.tokenizer, spec.method
    if tok.train is not None and arch is None:
        problems.append(
            SpecError(
                "tokenizer.train",
                "is only allowed with model.architecture",
                "remove tokenizer.train; a pretrained model brings its own tokenizer",
            )
        )
    if arch is not None and tok.train is None and tok.uri is None:
        problems.append(
            SpecError(
                "tokenizer",
                "a model built from model.architecture needs a tokenizer",
                "set tokenizer.train (e.g. {vocabSize: 8000}) or tokenizer.uri",
            )
        )
    formats = STAGE_FORMATS[method.stage]
    if spec.data.format not in formats:
        problems.append(
            SpecError(
                "data.format",
                f"{spec.data.format!r} does not fit method.stage {method.stage!r}",
                f"use data.format: {' or '.join(formats)}",
            )
        )
    if method.stage == "dpo" and arch is not None:
        problems.append(
            SpecError(
                "model.architecture",
                "stage dpo needs a trained policy, not random weights",
                "use model.uri or model.fromRun (e.g. an SFT run)",
            )
        )
    if method.stage == "pretrain" and method.adapter.type != "none":
        problems.append(
            SpecError(
                "method.adapter.type",
                "adapters fine-tune a trained model; pretraining trains all weights",
                "use adapter.type: none for stage pretrain",
            )
        )
    if arch is not None and method.adapter.type != "none":
        problems.append(
            SpecError(
                "method.adapter.type",
                "an adapter on random weights learns nothing useful",
                "use adapter.type: none with model.architecture",
            )
        )
    if arch is not None:
        vocab = tok.train.vocab_size if tok.train is not None else None
        if arch.vocab_size is not None and vocab is not None and arch.vocab_size < vocab:
            problems.append(
                SpecError(
                    "model.architecture.vocabSize",
                    f"{arch.vocab_size} is smaller than tokenizer.train.vocabSize {vocab}",
                    "remove vocabSize (it follows the tokenizer) or make it at least the tokenizer's",
                )
            )
        if spec.data.block_size > arch.context_length:
            problems.append(
                SpecError(
                    "data.blockSize",
                    f"{spec.data.block_size} exceeds model.architecture.contextLength "
                    f"{arch.context_length}",
                    "lower blockSize or raise contextLength",
                )
            )
    res, dist, train = spec.resources, spec.distributed, spec.training
    if train.optimizer.endswith(EIGHT_BIT_SUFFIX) and dist.zero_stage >= 1 and res.world_size > 1:
        problems.append(
            SpecError(
                "training.optimizer",
                f"{train.optimizer} with zeroStage {dist.zero_stage} on {res.world_size} processes: "
                "bitsandbytes optimizer state is not sharded by DeepSpeed",
                "use adamw_torch, or zeroStage: 0",
            )
        )
    if train.precision == "fp16" and res.gpus_per_node == 0:
        problems.append(
            SpecError(
                "training.precision",
                "fp16 needs a GPU (gpusPerNode is 0)",
                "use bf16 or fp32 on CPU",
            )
        )
    if spec.sanity is not None and spec.sanity.gpus is not None:
        if spec.sanity.gpus > res.total_gpus:
            problems.append(
                SpecError(
                    "sanity.gpus",
                    f"{spec.sanity.gpus} exceeds the run's {res.total_gpus} GPUs",
                    f"use at most {res.total_gpus}",
                )
            )
        elif spec.sanity.gpus > res.gpus_per_node:
            problems.append(
                SpecError(
                    "sanity.gpus",
                    f"{spec.sanity.gpus} exceeds gpusPerNode {res.gpus_per_node}: the gate runs "
                    "in one pod on one node",
                    f"use at most {res.gpus_per_node}",
                )
            )
    if spec.output.merge and method.adapter.type == "none":
        problems.append(
            SpecError(
                "output.merge",
                "there is no adapter to merge (method.adapter.type is none)",
                "remove output.merge, or train an adapter (lora or qlora)",
            )
        )
    if spec.output.merge and spec.model.quantized:
        problems.append(
            SpecError(
                "output.merge",
                "the base at model.uri is declared quantized; merging into a 4-bit "
                "base corrupts the model",
                "point model.uri at the full-precision base",
            )
        )
    if method.adapter.type == "qlora" and train.precision == "fp32" and res.gpus_per_node > 0:
        problems.append(
            SpecError(
                "training.precision",
                "qlora computes in bf16 or fp16 on GPUs",
                "use bf16",
            )
        )
    return problems


class ObjectMeta(BaseModel):
    """The parts of metadata kubetrain reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None

    @field_validator("name")
    @classmethod
    def _dns1035(cls, value: str) -> str:
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(
                f"{len(value)} characters is too long: child objects append suffixes — "
                f"use at most {MAX_NAME_LENGTH}"
            )
        if not re.match(DNS1035, value):
            raise ValueError(
                "must be a DNS-1035 label (lower-case letters, digits and '-', starting with a "
                "letter) — rename the run"
            )
        return value


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
    def _not_itself(self) -> TrainingRun:
        if self.spec.model.from_run == self.metadata.name:
            raise SpecError(
                "spec.model.fromRun",
                "names this run itself",
                "name the run whose output this run starts from",
            )
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
        if isinstance(ctx_error, SpecErrors | SpecError):
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
    ENDPOINT_PATTERN: "an http(s) URL without user:password@ (credentials go in the Secret)",
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
    """Validate a TrainingRun document; raises :class:`InvalidRun` with every problem."""
    try:
        return TrainingRun.model_validate(document)
    except ValidationError as error:
        raise InvalidRun(problems_from(error)) from None


class InvalidRun(ValueError):
    """Every problem found in one TrainingRun."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))
