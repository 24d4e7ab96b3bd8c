"""The memory model: bytes per process of a training or evaluation stage, before it runs.

Written once for both sides: the operator's plan and `kubetrain fit` estimate every stage and
rung from the spec, the preprocess stage does it on CPU when only the model's config.json knows
the size, and the train and sanity stages check the real device with it before loading weights.
Standard library only (the contract's rule).

The model is a sum of named terms, each a count of tensor bytes that can be checked against
tensors measured after a real step (tests/trainer/test_memory_measured.py) and against
DeepSpeed's own estimators (tests/operator/test_memory_model.py). Where a constant is an
approximation its source is written beside it; docs/fit.md explains every term.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal

GIB: Final = 1024**3

Attention = Literal["sdpa", "eager", "flash_attention_2"]
Mode = Literal["train", "eval"]

#: Bytes per element of each precision name.
DTYPE_BYTES: Final[dict[str, int]] = {"fp32": 4, "bf16": 2, "fp16": 2}

#: bitsandbytes NF4 with double quantization: 4 bits plus 8-bit absmax per 64 weights plus an
#: fp32 constant per 256 absmax blocks = 4.127 bits (QLoRA paper, Dettmers et al. 2023, §3).
NF4_BYTES: Final = (4 + 8 / 64 + 32 / (64 * 256)) / 8
#: bitsandbytes' 8-bit optimizers: one byte per state element (two states for Adam) plus an
#: fp32 absmax per 256-element block (bnb `optim.optimizer.Optimizer8bit`, blockwise).
ADAM_8BIT_BYTES: Final = 2 * (1 + 4 / 256)
#: The CUDA context, cuBLAS/cuDNN workspaces and the allocator's own pages: outside
#: torch.cuda.max_memory_allocated, observed at 0.5–0.9 GiB on A100/H100 with torch 2.x;
#: rounded up. NCCL adds its channel buffers (NCCL_BUFFSIZE 4 MiB × channels × peers) on
#: several processes.
CUDA_CONTEXT_BYTES: Final = 1 * GIB
NCCL_BUFFER_BYTES: Final = GIB // 2
#: Reserved-but-unallocated memory of PyTorch's caching allocator under a training loop's
#: varying shapes: 5–15% of what is allocated and freed every step (PyTorch "CUDA memory
#: management" notes; less with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).
FRAGMENTATION: Final = 0.10
#: Terms allocated and freed every step: the ones the fragmentation margin applies to.
DYNAMIC_TERMS: Final = (
    "activations",
    "recomputed layer",
    "logits",
    "optimizer step",
    "ZeRO-3 gathered layer",
    "dequantized weight",
)
#: Bytes of one logit over a forward and backward of the loss: the 16-bit logits (2), their fp32
#: upcast in transformers' ForCausalLMLoss (4), log-softmax saved for backward (4) and the fp32
#: gradient being built (4). fp32 compute has no separate upcast copy.
LOGIT_BYTES: Final[dict[str, int]] = {"bf16": 14, "fp16": 14, "fp32": 12}
MODULE_NAMES: Final = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZED_OPTIMIZERS: Final = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


class ShapeError(ValueError):
    """A config.json that does not describe a decoder the model can count: names the key."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a decoder-only transformer (Llama, Mistral, Qwen2, …)."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    experts: int = 1
    """Experts per MoE layer (1: a dense MLP)."""
    experts_per_token: int = 1

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.heads

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear of one decoder layer, by module name."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_size
        return {
            "q_proj": (h, self.heads * d),
            "k_proj": (h, self.kv_heads * d),
            "v_proj": (h, self.kv_heads * d),
            "o_proj": (self.heads * d, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def _linear_counts(self) -> dict[str, int]:
        """How many copies of each linear one layer holds (MoE: an MLP per expert)."""
        mlp = ("gate_proj", "up_proj", "down_proj")
        return {name: self.experts if name in mlp else 1 for name in MODULE_NAMES}

    @property
    def layer_linear_parameters(self) -> int:
        dims, counts = self.module_dims(), self._linear_counts()
        router = self.hidden_size * self.experts if self.experts > 1 else 0
        return sum(a * b * counts[n] for n, (a, b) in dims.items()) + router

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_parameters(self) -> int:
        """The output embedding (lm_head), unless tied to the input one."""
        return 0 if self.tie_word_embeddings else self.embedding_parameters

    @property
    def norm_parameters(self) -> int:
        return (2 * self.layers + 1) * self.hidden_size

    @property
    def linear_parameters(self) -> int:
        """The decoder layers' linear weights: what QLoRA quantizes to 4 bits."""
        return self.layers * self.layer_linear_parameters

    @property
    def parameters(self) -> int:
        return (
            self.linear_parameters
            + self.embedding_parameters
            + self.head_parameters
            + self.norm_parameters
        )

    @property
    def largest_layer_parameters(self) -> int:
        """The largest module ZeRO-3 gathers at once (a decoder layer or an embedding)."""
        return max(self.layer_linear_parameters, self.embedding_parameters)

    def lora_parameters(self, r: int, targets: tuple[str, ...]) -> int:
        """LoRA's A (r × in) and B (out × r) for each adapted linear of every layer. A module
        name this model does not know counts as the widest linear (an upper bound)."""
        dims, counts = self.module_dims(), self._linear_counts()
        widest = max(a + b for a, b in dims.values())
        per_layer = sum(r * (sum(dims[t]) * counts[t] if t in dims else widest) for t in targets)
        return self.layers * per_layer

    def lora_matrices(self, r: int, targets: tuple[str, ...]) -> list[tuple[int, int]]:
        dims = self.module_dims()
        pairs: list[tuple[int, int]] = []
        for t in targets:
            a, b = dims.get(t, (self.hidden_size, self.hidden_size))
            pairs += [(r, a), (b, r)]
        return pairs * self.layers

    def matrices(self) -> list[tuple[int, int]]:
        """Every weight matrix (rows, cols): Adafactor factors its second moment over them."""
        dims, counts = self.module_dims(), self._linear_counts()
        layer = [(b, a) for n, (a, b) in dims.items() for _ in range(counts[n])]
        heads = [(self.vocab_size, self.hidden_size)] * (1 if self.tie_word_embeddings else 2)
        return layer * self.layers + heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        return cls(**data)

    @classmethod
    def from_architecture(cls, arch: dict[str, Any], vocab: int) -> ModelShape:
        """A model built from the stage contract's resolved architecture (camelCase, as the plan
        writes it) with a tokenizer of `vocab` tokens: the larger of the two vocabularies, as the
        trainer builds it."""
        return cls(
            hidden_size=arch["hiddenSize"],
            layers=arch["layers"],
            heads=arch["heads"],
            kv_heads=arch["kvHeads"],
            intermediate_size=arch["intermediateSize"],
            vocab_size=max(arch.get("vocabSize") or 0, vocab),
            tie_word_embeddings=arch["tieWordEmbeddings"],
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelShape:
        """The shape of a transformers config.json (Llama, Mistral, Qwen2, Mixtral and kin)."""
        config = config.get("text_config", config) if "hidden_size" not in config else config

        def need(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ShapeError(
                    f"{source}: {key}: expected a positive integer, got {value!r} — the memory "
                    "model counts decoder-only transformers (Llama, Mistral, Qwen2, Mixtral); "
                    "set resources.gpuMemory only for such a model, or leave it unset to skip "
                    "the fit check"
                )
            return value

        heads = need("num_attention_heads")
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim")
        experts = config.get("num_local_experts") or config.get("num_experts") or 1
        return cls(
            hidden_size=need("hidden_size"),
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=int(kv),
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # The default head size (hidden ÷ heads) is left implicit: one shape, one spelling.
            head_dim=head_dim
            if isinstance(head_dim, int) and 0 < head_dim != config["hidden_size"] // heads
            else None,
            experts=int(experts),
            experts_per_token=int(config.get("num_experts_per_tok") or 1),
        )


@dataclass(frozen=True)
class Setup:
    """How one stage process holds and trains the model: the plan resolves every field."""

    stage: str
    """The plan's stage name (sanity-1, train, merge)."""
    where: str
    """The spec path the stage's settings come from, for messages (spec, spec.sanity.rungs[0])."""
    mode: Mode
    method: str
    adapter: str
    """none, lora or qlora."""
    lora_r: int
    target_modules: tuple[str, ...]
    precision: str
    """Compute precision: bf16, fp16 or fp32."""
    weight_precision: str
    """The dtype a full fine-tune loads its weights in (fp32 or bf16)."""
    optimizer: str
    zero_stage: int
    offload: bool
    world_size: int
    procs_per_node: int
    micro_batch_size: int
    block_size: int
    gradient_checkpointing: bool
    attention: str
    compile: bool
    reference: Literal["none", "model", "precomputed"]
    """DPO's reference: none (SFT, pretrain, or an adapter run's disabled adapter), a frozen copy
    of the policy, or log-probabilities computed once before training."""
    gpu: bool
    """Trains on GPUs (False: CPU processes; nothing is checked against a GPU)."""
    paths: dict[str, str] = field(default_factory=dict)
    """Spec path of each tunable setting (for the fixes a refusal offers)."""

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Setup:
        return cls(**{**data, "target_modules": tuple(data["target_modules"])})


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Estimate:
    """Per process: `gpu` terms on the device (or in RAM for CPU processes), `host` terms in the
    node's RAM (DeepSpeed offload), per process."""

    setup: Setup
    terms: tuple[Term, ...]
    host: tuple[Term, ...] = ()

    @property
    def allocated(self) -> int:
        """What the caching allocator hands out at the peak: torch.cuda.max_memory_allocated."""
        return sum(t.bytes for t in self.terms if t.name not in ("CUDA context", "fragmentation"))

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def host_total(self) -> int:
        return sum(t.bytes for t in self.host)

    def largest(self, n: int = 3) -> tuple[Term, ...]:
        return tuple(sorted(self.terms, key=lambda t: -t.bytes)[:n])

    def term(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)


def gib(n: float) -> str:
    """Bytes for people: GiB with one decimal, MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


# ------------------------------------------------------------------------------------ the model


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """The peak bytes per process of `setup` on a model of `shape`, as named terms."""
    if setup.mode == "eval":
        return _estimate_eval(shape, setup)
    states = _model_states(shape, setup)
    moved = _offloaded(setup)
    gpu = [t for t in states if t.bytes and t.name not in moved]
    host = [t for t in states if t.bytes and t.name in moved]
    activations = _activation_terms(shape, setup)
    step = _step_temporaries(shape, setup)
    # Activations are freed before the optimizer steps: the peak is the larger phase.
    if sum(t.bytes for t in step) > sum(t.bytes for t in activations):
        gpu += step
    else:
        gpu += activations
    return _with_overheads(setup, gpu, host)


def _with_overheads(setup: Setup, gpu: list[Term], host: list[Term]) -> Estimate:
    gpu = [t for t in gpu if t.bytes]
    if setup.gpu:
        # Model states are allocated once, in large blocks; what comes and goes every step
        # (activations, logits, gathered layers, step temporaries) fragments the cache.
        dynamic = sum(t.bytes for t in gpu if t.name in DYNAMIC_TERMS)
        gpu.append(
            Term(
                "fragmentation",
                int(dynamic * FRAGMENTATION),
                "caching allocator: reserved beyond allocated",
            )
        )
        context = CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if setup.world_size > 1 else 0)
        gpu.append(Term("CUDA context", context, "runtime, cuBLAS workspace, NCCL buffers"))
    return Estimate(setup=setup, terms=tuple(gpu), host=tuple(host))


def _offloaded(setup: Setup) -> tuple[str, ...]:
    """The terms DeepSpeed moves to the node's RAM (offload: cpu, from ZeRO-2)."""
    if not (setup.offload and setup.zero_stage >= 2):
        return ()
    moved = ("optimizer state", "fp32 master weights", "fp32 gradients", "gradients")
    return moved + (("weights",) if setup.zero_stage == 3 else ())


def _trainable(shape: ModelShape, setup: Setup) -> int:
    if setup.adapter == "none":
        return shape.parameters
    return shape.lora_parameters(setup.lora_r, setup.target_modules)


def _weight_terms(shape: ModelShape, setup: Setup) -> list[Term]:
    """The parameters as they sit in memory: full, LoRA base plus adapter, or the 4-bit base."""
    n = setup.world_size if setup.zero_stage == 3 else 1
    compute = DTYPE_BYTES[setup.precision]
    if setup.adapter == "qlora":
        # prepare_model_for_kbit_training casts every parameter bnb did not quantize (embeddings,
        # lm_head, norms) to fp32.
        others = shape.parameters - shape.linear_parameters
        base = shape.linear_parameters * NF4_BYTES + others * 4
        return [Term("weights", int(base / n), "4-bit NF4 linears, fp32 embeddings and norms")]
    if setup.adapter == "lora":
        return [
            Term("weights", shape.parameters * compute // n, f"frozen base in {setup.precision}")
        ]
    if setup.deepspeed and setup.precision != "fp32":
        # DeepSpeed runs the module in 16 bits and keeps the fp32 copy in its optimizer.
        return [Term("weights", shape.parameters * 2 // n, "16-bit module under DeepSpeed")]
    wb = DTYPE_BYTES[setup.weight_precision]
    return [Term("weights", shape.parameters * wb // n, f"loaded in {setup.weight_precision}")]


def _optimizer_bytes(shape: ModelShape, setup: Setup, trainable: int, state: int) -> int:
    """Optimizer state bytes of `trainable` parameters whose states are `state` bytes wide."""
    name = setup.optimizer
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        return int(trainable * ADAM_8BIT_BYTES)
    if name == "paged_adamw_32bit":
        return trainable * 8  # bitsandbytes' 32-bit states are fp32 whatever the weights
    if name == "sgd":
        return 0  # transformers' sgd: torch.optim.SGD without momentum
    if name == "adafactor":
        # Factored second moment (a row and a column vector per matrix), no first moment
        # (transformers' Adafactor: beta1=None); vectors keep a full second moment. Always fp32:
        # Adafactor upcasts a 16-bit gradient and allocates its state like it (measured:
        # tests/trainer/test_memory_measured.py).
        if setup.adapter == "none":
            matrices = shape.matrices()
            vectors = shape.norm_parameters
        else:
            matrices, vectors = shape.lora_matrices(setup.lora_r, setup.target_modules), 0
        return (sum(r + c for r, c in matrices) + vectors) * 4
    return 2 * trainable * state  # AdamW: exp_avg and exp_avg_sq


def _model_states(shape: ModelShape, setup: Setup) -> list[Term]:
    """Weights, gradients, master copies and optimizer state, partitioned as ZeRO does."""
    terms = _weight_terms(shape, setup)
    trainable = _trainable(shape, setup)
    adapter = setup.adapter != "none"
    n, stage = setup.world_size, setup.zero_stage
    if adapter:
        # PEFT keeps adapter weights in fp32 on a 16-bit base (autocast_adapter_dtype).
        terms.append(Term("adapter weights", trainable * 4 // (n if stage == 3 else 1)))
    if setup.deepspeed and setup.precision != "fp32":
        grad16 = 2 * trainable // (n if stage >= 2 else 1)
        terms += [
            Term("gradients", grad16, "16-bit, partitioned from ZeRO-2"),
            Term("fp32 gradients", 4 * trainable // n, "DeepSpeed's fp32 partition"),
            Term("fp32 master weights", 4 * trainable // n, "DeepSpeed's optimizer copy"),
            Term("optimizer state", _optimizer_bytes(shape, setup, trainable, 4) // n),
        ]
        if stage == 3:
            terms.append(
                Term(
                    "ZeRO-3 gathered layer",
                    4 * shape.largest_layer_parameters,
                    "the live module's weights and gradients",
                )
            )
        return terms
    if setup.deepspeed:  # fp32 DeepSpeed: no separate master copy, fp32 gradients
        parts = n if stage >= 2 else 1
        terms += [
            Term("gradients", 4 * trainable // parts),
            Term("optimizer state", _optimizer_bytes(shape, setup, trainable, 4) // n),
        ]
        return terms
    width = 4 if adapter else DTYPE_BYTES[setup.weight_precision]
    terms += [
        Term("gradients", trainable * width, "in the weights' dtype"),
        Term("optimizer state", _optimizer_bytes(shape, setup, trainable, width)),
    ]
    if n > 1:
        # torch DDP keeps its own flat gradient buckets (gradient_as_bucket_view=False).
        terms.append(Term("DDP gradient buckets", trainable * width))
    return terms


def _step_temporaries(shape: ModelShape, setup: Setup) -> list[Term]:
    """torch's foreach AdamW (adamw_torch, not fused, not under DeepSpeed) allocates a copy of
    exp_avg_sq for its sqrt during the step (torch.optim.adamw._multi_tensor_adamw)."""
    if setup.optimizer != "adamw_torch" or setup.deepspeed or not setup.gpu:
        return []
    width = 4 if setup.adapter != "none" else DTYPE_BYTES[setup.weight_precision]
    return [Term("optimizer step", _trainable(shape, setup) * width, "foreach sqrt(exp_avg_sq)")]


def _per_token_layer_bytes(shape: ModelShape, setup: Setup) -> float:
    """Activation bytes one decoder layer saves for backward, per token, without recompute.

    Counted from transformers' Llama layer: the q/k/v input, q, k and v as attention saves them
    (k and v repeated to the query heads), the attention output and o_proj's contiguous input
    (6h); the MLP's gate and up outputs, the SiLU output and the product that is down_proj's
    input (4i; compiled, inductor recomputes the pointwise two: 2i); each RMSNorm saves its input
    upcast to fp32 and the normalised 16-bit product (compiled: fused to one 16-bit input)."""
    a = DTYPE_BYTES[setup.precision]
    h = shape.hidden_size
    mlp = shape.intermediate_size * shape.experts_per_token
    if setup.compile:
        return a * (6 * h + 2 * mlp) + 2 * a * h
    return a * (6 * h + 4 * mlp) + 2 * (4 * h + a * h)


def _attention_bytes(shape: ModelShape, setup: Setup, sequences: int) -> int:
    """Eager attention materialises the scores: softmax's fp32 output saved for its backward and
    its 16-bit cast saved for the value matmul, heads × s² each. SDPA's flash and
    memory-efficient kernels and flash-attention 2 save only a logsumexp per head and token."""
    s = setup.block_size
    if setup.attention == "eager":
        return sequences * shape.heads * s * s * (4 + DTYPE_BYTES[setup.precision])
    return sequences * shape.heads * s * 4


def _module_dtype_bytes(setup: Setup) -> int:
    """Bytes per element of the module's weights, and so of the residual stream between layers
    (autocast computes in 16 bits, but fp32 weights keep the residual adds in fp32)."""
    if setup.precision == "fp32":
        return 4
    if setup.deepspeed or setup.adapter != "none":
        return 2
    return DTYPE_BYTES[setup.weight_precision]


def _activation_terms(shape: ModelShape, setup: Setup) -> list[Term]:
    # DPO runs chosen and rejected through the policy as one concatenated batch.
    sequences = setup.micro_batch_size * (2 if setup.method == "dpo" else 1)
    tokens = sequences * setup.block_size
    layer = tokens * _per_token_layer_bytes(shape, setup) + _attention_bytes(
        shape, setup, sequences
    )
    stream = _module_dtype_bytes(setup)
    if setup.gradient_checkpointing:
        saved = Term(
            "activations",
            int(shape.layers * tokens * shape.hidden_size * stream),
            "checkpointed: each layer's input",
        )
        work = Term("recomputed layer", int(layer), "one layer's activations during backward")
        terms = [saved, work]
    else:
        terms = [Term("activations", int(shape.layers * layer), "every layer's saved tensors")]
    terms.append(
        Term(
            "logits", tokens * shape.vocab_size * LOGIT_BYTES[setup.precision], "loss and its grad"
        )
    )
    if setup.adapter == "qlora":
        widest = max(a * b for a, b in shape.module_dims().values())
        terms.append(Term("dequantized weight", widest * DTYPE_BYTES[setup.precision]))
    if setup.reference == "model":
        terms.append(_reference_term(shape, setup))
    return terms


def _reference_term(shape: ModelShape, setup: Setup) -> Term:
    """Full DPO's frozen reference copy: 16-bit and partitioned under DeepSpeed ZeRO-3 (TRL
    prepares it for inference with the policy's ZeRO-3 config), whole otherwise, in the dtype
    the policy loads."""
    if setup.deepspeed and setup.precision != "fp32":
        n = setup.world_size if setup.zero_stage == 3 else 1
        return Term("reference model", shape.parameters * 2 // n, "frozen 16-bit copy")
    wb = DTYPE_BYTES[setup.weight_precision]
    return Term(
        "reference model", shape.parameters * wb, f"frozen copy in {setup.weight_precision}"
    )


def _estimate_eval(shape: ModelShape, setup: Setup) -> Estimate:
    """Merge and evaluation: the base in the compute dtype, no gradients; forward only."""
    tokens = setup.micro_batch_size * setup.block_size
    a = DTYPE_BYTES[setup.precision]
    terms = [
        Term("weights", shape.parameters * a, f"base in {setup.precision}"),
        Term("activations", int(tokens * _per_token_layer_bytes(shape, setup))),
        Term("logits", tokens * shape.vocab_size * (a + 4), "16-bit logits and the fp32 loss"),
    ]
    if setup.adapter != "none":
        terms.append(
            Term("adapter weights", shape.lora_parameters(setup.lora_r, setup.target_modules) * 4)
        )
    return _with_overheads(setup, terms, [])


# ------------------------------------------------------------------------------------ refusals


@dataclass(frozen=True)
class Fix:
    """One change to a stage's settings, in the spec's words."""

    text: str
    setup: Setup


def _fixes(setup: Setup) -> list[Fix]:
    """Single changes, cheapest first: free ones, then compute for memory, then communication."""
    p = setup.paths
    out: list[Fix] = []
    if setup.micro_batch_size > 1:
        m = max(1, setup.micro_batch_size // 2)
        out.append(
            Fix(
                f"{p['micro_batch_size']}: {m} (raise gradientAccumulationSteps to keep the batch)",
                replace(setup, micro_batch_size=m),
            )
        )
    if setup.attention == "eager":
        out.append(Fix(f"{p['attention']}: sdpa", replace(setup, attention="sdpa")))
    if setup.reference == "model":
        out.append(
            Fix(
                f"{p['reference']}: true",
                replace(setup, reference="precomputed"),
            )
        )
    if (
        setup.adapter == "none"
        and not setup.deepspeed
        and setup.weight_precision == "fp32"
        and setup.precision == "bf16"
    ):
        out.append(
            Fix(
                f"{p['weight_precision']}: bf16 (no fp32 master copy without DeepSpeed)",
                replace(setup, weight_precision="bf16"),
            )
        )
    if not setup.gradient_checkpointing:
        out.append(
            Fix(f"{p['gradient_checkpointing']}: true", replace(setup, gradient_checkpointing=True))
        )
    eight_bit_allowed = setup.world_size == 1 or not setup.deepspeed
    if setup.optimizer not in QUANTIZED_OPTIMIZERS and eight_bit_allowed and setup.gpu:
        out.append(
            Fix(f"{p['optimizer']}: paged_adamw_8bit", replace(setup, optimizer="paged_adamw_8bit"))
        )
    if setup.world_size > 1 and setup.zero_stage < 3 and setup.adapter != "qlora":
        for stage in range(max(setup.zero_stage + 1, 2), 4):
            optimizer = setup.optimizer
            if optimizer in QUANTIZED_OPTIMIZERS:
                optimizer = "adamw_torch"
            out.append(
                Fix(
                    f"{p['zero_stage']}: {stage}"
                    + (
                        f" with {p['optimizer']}: adamw_torch"
                        if optimizer != setup.optimizer
                        else ""
                    ),
                    replace(setup, zero_stage=stage, optimizer=optimizer),
                )
            )
    if not setup.offload and setup.adapter != "qlora":
        # DeepSpeed offloads its own CPU Adam's state, not a bitsandbytes optimizer's.
        stage = max(setup.zero_stage, 2)
        swap = setup.optimizer in QUANTIZED_OPTIMIZERS
        out.append(
            Fix(
                f"{p['offload']}: cpu with {p['zero_stage']}: {stage}"
                + (f" and {p['optimizer']}: adamw_torch" if swap else ""),
                replace(
                    setup,
                    offload=True,
                    zero_stage=stage,
                    optimizer="adamw_torch" if swap else setup.optimizer,
                ),
            )
        )
    return out


def fixes(shape: ModelShape, setup: Setup, capacity: int, most: int = 3) -> list[str]:
    """The cheapest changes that make `setup` fit `capacity`: single ones first; when none
    suffices alone, the cheapest ones together, in order, until it fits."""
    singles = _fixes(setup)
    fitting = [f.text for f in singles if estimate(shape, f.setup).total <= capacity]
    if fitting:
        return fitting[:most]
    combined = setup
    texts: list[str] = []
    for _ in range(8):
        step = next(iter(_fixes(combined)), None)
        if step is None:
            return []
        # A later step on the same field replaces the earlier one (microBatchSize 2, then 1).
        name = step.text.split(":")[0]
        combined = step.setup
        texts = [*(t for t in texts if t.split(":")[0] != name), step.text]
        if estimate(shape, combined).total <= capacity:
            return [" and ".join(texts)]
    return []


def refusal(estimate_: Estimate, shape: ModelShape, capacity: int, capacity_source: str) -> str:
    """Why a stage does not fit, how much, and the way out; callers put `setup.where: ` first
    (the operator's SpecError does, and the trainer's refusal prints the same line)."""
    s = estimate_.setup
    largest = ", ".join(f"{t.name} {gib(t.bytes)}" for t in estimate_.largest())
    ways = fixes(shape, s, capacity)
    way = (
        "fits with: " + "; or ".join(ways)
        if ways
        else "no single setting makes it fit: use more GPUs (resources), a LoRA or QLoRA "
        "adapter, or a GPU with more memory"
    )
    return (
        f"{s.stage} on {s.world_size} process(es) needs about {gib(estimate_.total)} per GPU, "
        f"the GPU has {gib(capacity)} ({capacity_source}) — largest: {largest} — {way}"
    )


def row(estimate_: Estimate, capacity: int | None) -> dict[str, Any]:
    """One line of the fit table (status.fit, the preprocess result, `kubetrain fit`)."""
    s = estimate_.setup
    return {
        "stage": s.stage,
        "worldSize": s.world_size,
        "device": "gpu" if s.gpu else "cpu",
        "estimateBytes": estimate_.total,
        "allocatedBytes": estimate_.allocated,
        "hostBytes": estimate_.host_total,
        "largest": [[t.name, t.bytes] for t in estimate_.largest()],
        "fits": None if capacity is None or not s.gpu else estimate_.total <= capacity,
    }


# ------------------------------------------------------------------------- the GPU's capacity

#: Memory of GPU products as GPU Feature Discovery names them (nvidia.com/gpu.product), in GiB
#: as marketed (the label nvidia.com/gpu.memory, in MiB, wins when present).
GPU_PRODUCTS: Final[dict[str, int]] = {
    "A10G": 24,
    "A10": 24,
    "L4": 24,
    "L40S": 48,
    "L40": 48,
    "A100-SXM4-40GB": 40,
    "A100-PCIE-40GB": 40,
    "A100-SXM4-80GB": 80,
    "A100-PCIE-80GB": 80,
    "A100 80GB PCIe": 80,
    "H100-80GB-HBM3": 80,
    "H100-PCIe": 80,
    "H100-SXM5-80GB": 80,
    "H100 NVL": 94,
    "H200": 141,
    "B200": 180,
    "T4": 16,
    "V100-SXM2-16GB": 16,
    "V100-SXM2-32GB": 32,
    "RTX-A6000": 48,
}
GPU_MEMORY_LABEL: Final = "nvidia.com/gpu.memory"
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"


def gpu_memory_from_labels(labels: dict[str, str]) -> tuple[int, str] | None:
    """(bytes, the label it came from) from a node selector's GPU Feature Discovery labels."""
    memory = labels.get(GPU_MEMORY_LABEL)
    if memory is not None and memory.isdigit():
        return int(memory) * 1024**2, f"nodeSelector {GPU_MEMORY_LABEL}={memory}"
    product = labels.get(GPU_PRODUCT_LABEL)
    if product is not None:
        name = product.removeprefix("NVIDIA-").removeprefix("Tesla-")
        for known, size in sorted(GPU_PRODUCTS.items(), key=lambda kv: -len(kv[0])):
            if name == known or name.replace(" ", "-") == known.replace(" ", "-"):
                return size * GIB, f"nodeSelector {GPU_PRODUCT_LABEL}={product}"
    return None


#: Every suffix the API's quantity pattern admits (api.QUANTITY_PATTERN), as a factor.
QUANTITY_FACTORS: Final[dict[str, float]] = {
    "": 1,
    "m": 1e-3,
    **{s: 1000**i for i, s in enumerate("kMGTPE", start=1)},
    **{f"{s}i": 1024**i for i, s in enumerate("KMGTPE", start=1)},
}


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (80Gi, 81559Mi, 500M, 0.5Gi) in whole bytes."""
    number = text.rstrip("mkKMGTPEi")
    suffix = text[len(number) :]
    if suffix not in QUANTITY_FACTORS:
        raise ValueError(f"{text!r} is not a memory quantity such as 80Gi")
    return math.floor(float(number) * QUANTITY_FACTORS[suffix])
