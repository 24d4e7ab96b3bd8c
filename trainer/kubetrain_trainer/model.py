"""Models and tokenizers: built from an architecture, or loaded from a local directory.

A model comes from `model.architecture` (a Llama built from its config, vocabulary from the
tokenizer) or `model.uri` (local, pvc, or S3 and `hf://` downloaded once into the workdir;
transformers itself never reaches the Hub: `local_files_only`). Adapters are PEFT
LoRA; QLoRA loads the base in 4-bit NF4 with bitsandbytes. Every mismatch that would otherwise
surface as an index error hours into a run — a tokenizer larger than the embeddings, blocks longer
than the context — is refused here with exit 2 and a message that says what to change; so are
weights that cannot be read (a truncated or foreign `model.safetensors`, a `.bin` pickling more
than tensors: transformers loads it `weights_only`, so its payload never runs), naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from kubetrain_trainer import storage
from kubetrain_trainer.config import AdapterConfig, Architecture, ModelSource, S3Settings
from kubetrain_trainer.stage import InvalidInput, failure

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attention(name: str, field: str) -> str:
    """transformers' `attn_implementation` for `name`, refused (exit 2) when it needs a kernel
    the image lacks: flash_attention_2 needs the flash-attn package, which transformers would
    otherwise report only once the model loads (after the download)."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InvalidInput(
            f"{field}: flash_attention_2 needs the flash-attn package, which this trainer image "
            "does not have — install flash-attn (built for the image's torch and CUDA) in the "
            "trainer image, or use sdpa (PyTorch's fused attention, always available)"
        )
    return name


def local_dir(uri: str, workdir: Path, s3: S3Settings, what: str, *, fetch: bool = True) -> Path:
    """A model or tokenizer directory on local disk (S3 prefixes fetched into the workdir).

    `fetch=False` only names the directory another process of this node fetched (the trainer's
    ranks share one download: `train.fetch_inputs`); local and pvc paths are used in place.
    """
    dest = workdir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not fetch and (storage.is_s3(uri) or storage.is_hf(uri)):
        if not dest.is_dir():
            raise InvalidInput(
                f"{what}: {uri} is not in {dest}, where this node's first process was to fetch "
                "it — see that process's error; the processes of a node must share the workdir"
            )
        return dest
    try:
        return storage.download_dir(uri, dest, s3)
    except storage.NotFound as error:
        if storage.is_hf(uri):  # the Hub's answer says what to check (name, token)
            raise InvalidInput(f"{what}: {error.message}") from None
        raise InvalidInput(
            f"{what}: {uri} does not exist — point {what} at a directory saved with "
            "save_pretrained (config.json and *.safetensors for a model, tokenizer.json for a "
            "tokenizer)"
        ) from None
    except storage.StorageError as error:  # its own exit code: refused (2) or transient (1)
        raise failure(error.exit_code, f"{what}: {error.message}", error.details) from None


#: What `save_pretrained` writes that loading needs, per kind of directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_tokenizer(
    path: Path, what: str = "tokenizerUri", fix: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`. `what` names where the directory came from (a config
    field), `fix` what the user should do if it holds none (default: point `what` elsewhere)."""
    from transformers import AutoTokenizer

    fix = fix or f"point {what} at a directory written by tokenizer.save_pretrained(DIR)"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidInput(
            f"{what}: {path} holds no tokenizer (expected tokenizer.json and "
            f"tokenizer_config.json) — {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidInput(
            f"{what}: cannot load the tokenizer in {path}: {error} — re-save it with "
            "tokenizer.save_pretrained(DIR) using the transformers release of the trainer image"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_of(model_dir: Path) -> str | None:
    """The quantization method a saved model declares in its config.json (None: full precision)."""
    config_path = model_dir / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None


def build_llama(
    arch: Architecture,
    tokenizer: PreTrainedTokenizerBase,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised Llama whose vocabulary is the tokenizer's (or larger, if asked),
    initialised in fp32 and then cast to `dtype` (the weight precision of a full fine-tune)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    if arch.vocab_size is not None and arch.vocab_size < vocab:
        raise InvalidInput(
            f"model.architecture.vocabSize: {arch.vocab_size} is smaller than the tokenizer's "
            f"{vocab} tokens — leave it unset to use the tokenizer's size"
        )
    config = LlamaConfig(  # type: ignore[call-arg]  # attn_implementation: PreTrainedConfig's
        vocab_size=arch.vocab_size or vocab,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        max_position_embeddings=arch.context_length,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    # Built outside deepspeed.zero.Init on purpose: transformers 5.23 crashes initialising the
    # padding row of a partitioned embedding; DeepSpeed shards the built model instead.
    built = LlamaForCausalLM(config)
    return built if dtype == torch.float32 else built.to(dtype)  # type: ignore[arg-type]


def bnb_config(precision: str) -> Any:
    """4-bit NF4 with double quantization: the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[precision],
    )


def load_pretrained(
    model_dir: Path,
    *,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
    device: str = "cpu",
    what: str = "model.uri",
    fix: str | None = None,
) -> PreTrainedModel:
    """from_pretrained on a local directory, onto `device`; `quantize` = precision for a 4-bit
    QLoRA base. `what` names where the directory came from (a config field), `fix` what the user
    should do if it holds no model (default: point `what` at one)."""
    from transformers import AutoModelForCausalLM

    fix = fix or (
        f"point {what} at a directory written by model.save_pretrained(DIR) (nothing is fetched "
        "from the Hugging Face hub)"
    )
    missing = [
        expected
        for expected, names in (("config.json", ("config.json",)), ("weights", WEIGHT_FILES))
        if not any((model_dir / name).is_file() for name in names)
    ]
    if missing:
        raise InvalidInput(
            f"{what}: {model_dir} is not a saved model (no {' and no '.join(missing)}) — "
            "expected config.json and model.safetensors (or sharded model-*.safetensors with "
            f"model.safetensors.index.json) — {fix}"
        )
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "local_files_only": True,
    }
    if quantize is not None:
        kwargs.update(quantization_config=bnb_config(quantize), device_map={"": device})
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except SafetensorError as error:
        raise InvalidInput(
            f"{what}: {_weight_files(model_dir, '.safetensors')} is not a readable safetensors "
            f"file ({str(error).splitlines()[0]}): truncated or not safetensors at all — copy "
            "the model again, or re-save it with save_pretrained(DIR, safe_serialization=True)"
        ) from None
    except pickle.UnpicklingError:
        raise InvalidInput(
            f"{what}: {_weight_files(model_dir, '.bin')} holds pickled objects other than "
            "tensors: refused unread (unpickling them could run code) — re-save the model with "
            "save_pretrained(DIR, safe_serialization=True)"
        ) from None
    except (OSError, ValueError) as error:
        raise InvalidInput(
            f"{what}: cannot load the model in {model_dir}: {error} — re-save it with "
            "save_pretrained(DIR, safe_serialization=True); a causal LM of a model type the "
            "trainer image's transformers knows is required"
        ) from None


def _weight_files(model_dir: Path, suffix: str) -> str:
    """The weight files of one kind in a model directory, for a message that names them."""
    names = sorted(p.name for p in model_dir.glob(f"*{suffix}"))
    shown = ", ".join(str(model_dir / n) for n in names[:3]) + (", …" if len(names) > 3 else "")
    return shown or str(model_dir / f"*{suffix}")


def load_base(
    source: ModelSource,
    model_dir: Path | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    adapter: AdapterConfig,
    precision: str,
    weight_precision: str,
    attn_implementation: str,
    device: str,
) -> PreTrainedModel:
    """The model a run starts from: built from the architecture, or loaded from `model_dir` (the
    local copy of `model.uri`): in `weight_precision` for full training (fp32: mixed precision
    keeps fp32 masters; bf16: half the memory, see docs/trainer.md for what it costs), the
    compute dtype for a frozen LoRA base, 4-bit NF4 for QLoRA. The refusals of
    `train.refuse_broken_combinations` (adapters on an architecture) have run before."""
    full = DTYPES[weight_precision]
    if source.architecture is not None:
        return build_llama(
            source.architecture, tokenizer, attn_implementation=attn_implementation, dtype=full
        )
    assert source.uri is not None and model_dir is not None
    declared = quantization_of(model_dir)
    if declared is not None and adapter.type == "none":
        raise InvalidInput(
            f"model.uri: {source.uri} is pre-quantized ({declared}); a full fine-tune needs the "
            "full-precision weights — use adapter type lora/qlora or the original model"
        )
    if adapter.type == "qlora":
        return load_pretrained(
            model_dir,
            dtype=DTYPES[precision],
            attn_implementation=attn_implementation,
            quantize=precision,
            device=device,
        )
    dtype = DTYPES[precision] if adapter.type == "lora" else full
    return load_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)


def check_compatible(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, manifest: dict[str, Any]
) -> None:
    """Tokenizer and data must fit the model: refuse now rather than fail at step 1."""
    embeddings: Any = model.get_input_embeddings()
    rows = int(embeddings.num_embeddings)
    data_vocab = int(manifest["tokenizer"]["vocabSize"])
    for what, size in (("the tokenizer", len(tokenizer)), ("the dataset's tokenizer", data_vocab)):
        if size > rows:
            raise InvalidInput(
                f"tokenizer: {what} has {size} tokens but the model's embeddings have {rows} rows "
                "— train with the model's own tokenizer (leave tokenizer unset) or a model whose "
                "vocabulary covers it"
            )
    block = int(manifest["blockSize"])
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and block > context:
        raise InvalidInput(
            f"data.blockSize: {block} exceeds the model's context of {context} tokens — use "
            f"blockSize ≤ {context}"
        )


def lora_config(adapter: AdapterConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft takes any number
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        task_type="CAUSAL_LM",
    )


def attach_adapter(
    model: PreTrainedModel, adapter: AdapterConfig, gradient_checkpointing: bool
) -> PreTrainedModel:
    """Wrap the frozen base with trainable LoRA weights (the QLoRA base is prepared first)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if adapter.type == "qlora":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    try:
        peft_model = get_peft_model(model, lora_config(adapter))
    except ValueError as error:
        raise InvalidInput(f"method.adapter.targetModules: {error}") from None
    return peft_model  # type: ignore[return-value]
