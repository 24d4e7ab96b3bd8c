"""Models and tokenizers: built from an architecture, or loaded from a directory — never the hub.

A model comes from `model.architecture` (a Llama built from its config, vocabulary from the
tokenizer) or `model.uri` (local, pvc, or S3 downloaded once into the workdir). Adapters are PEFT
LoRA; QLoRA loads the base in 4-bit NF4 with bitsandbytes. Every mismatch that would otherwise
surface as an index error hours into a run — a tokenizer larger than the embeddings, blocks longer
than the context — is refused here with exit 2 and a message that says what to change.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kubetrain_trainer import storage
from kubetrain_trainer.config import AdapterConfig, Architecture, ModelSource, S3Settings
from kubetrain_trainer.stage import InvalidInput

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def local_dir(uri: str, workdir: Path, s3: S3Settings, what: str) -> Path:
    """A model or tokenizer directory on local disk (S3 prefixes fetched once into the workdir)."""
    dest = workdir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    try:
        return storage.download_dir(uri, dest, s3)
    except storage.NotFound:
        raise InvalidInput(f"{what}: {uri} does not exist") from None
    except storage.StorageError as error:
        raise InvalidInput(f"{what}: {error}") from None


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise InvalidInput(f"tokenizer: cannot load {path}: {error}") from None
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


def build_llama(arch: Architecture, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A randomly initialised Llama whose vocabulary is the tokenizer's (or larger, if asked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    if arch.vocab_size is not None and arch.vocab_size < vocab:
        raise InvalidInput(
            f"model.architecture.vocabSize: {arch.vocab_size} is smaller than the tokenizer's "
            f"{vocab} tokens — leave it unset to use the tokenizer's size"
        )
    config = LlamaConfig(
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
    )
    # Built outside deepspeed.zero.Init on purpose: transformers 5.23 crashes initialising the
    # padding row of a partitioned embedding; DeepSpeed shards the built model instead.
    return LlamaForCausalLM(config)


def bnb_config(precision: str) -> Any:
    """4-bit NF4 with double quantization: the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[precision],
    )


def load_pretrained(
    model_dir: Path, *, dtype: torch.dtype, quantize: str | None = None, device: str = "cpu"
) -> PreTrainedModel:
    """from_pretrained on a local directory; `quantize` = precision for a 4-bit QLoRA base."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if quantize is not None:
        kwargs.update(quantization_config=bnb_config(quantize), device_map={"": device})
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as error:
        raise InvalidInput(f"model.uri: cannot load {model_dir}: {error}") from None


def load_base(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    *,
    adapter: AdapterConfig,
    precision: str,
    workdir: Path,
    s3: S3Settings,
    device: str,
) -> PreTrainedModel:
    """The model a run starts from: fp32 for full training (mixed precision keeps fp32 masters),
    the compute dtype for a frozen LoRA base, 4-bit NF4 for QLoRA."""
    if source.architecture is not None:
        if adapter.type != "none":
            raise InvalidInput(
                "method.adapter: an adapter on a randomly initialised model trains nothing useful "
                "and its base is never saved — use adapter type none with model.architecture"
            )
        return build_llama(source.architecture, tokenizer)
    assert source.uri is not None
    model_dir = local_dir(source.uri, workdir, s3, "model.uri")
    declared = quantization_of(model_dir)
    if declared is not None and adapter.type == "none":
        raise InvalidInput(
            f"model.uri: {source.uri} is pre-quantized ({declared}); a full fine-tune needs the "
            "full-precision weights — use adapter type lora/qlora or the original model"
        )
    if adapter.type == "qlora":
        return load_pretrained(
            model_dir, dtype=DTYPES[precision], quantize=precision, device=device
        )
    dtype = DTYPES[precision] if adapter.type == "lora" else torch.float32
    return load_pretrained(model_dir, dtype=dtype)


def check_compatible(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, manifest: dict[str, Any]
) -> None:
    """Tokenizer and data must fit the model: refuse now rather than fail at step 1."""
    rows = int(model.get_input_embeddings().num_embeddings)
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
        lora_alpha=adapter.alpha,
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
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    try:
        peft_model = get_peft_model(model, lora_config(adapter))
    except ValueError as error:
        raise InvalidInput(f"method.adapter.targetModules: {error}") from None
    return peft_model  # type: ignore[return-value]
