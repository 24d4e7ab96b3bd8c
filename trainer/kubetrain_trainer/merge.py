"""The merge stage: adapter → full-precision base, perplexity on the validation split, model card.

    python -m kubetrain_trainer merge --config merge.json --workdir W

A LoRA/QLoRA adapter from `final/` is merged with PEFT's `merge_and_unload` into the base loaded
in full precision (fp32), then saved in the run's precision as `merged/` (safetensors, tokenizer,
model card). A QLoRA adapter is merged into the original weights, not into their NF4 round trip:
the merged model is what a user serving the base in 16-bit gets. A base that is itself quantized
is refused (exit 2) — declared by `model.quantized` or found in its config.json — because the
adapter's deltas cannot be folded into 4-bit codes without corrupting the model. Full fine-tunes
and `merge: false` runs are evaluated and documented as they are.

Evaluation runs where the pod's accelerator is: on the GPU (CUDA) in the run's `precision` when
there is one, on the CPU otherwise (`evalDevice` in metrics.json says which). The merge itself
is done in fp32 in host memory — cheap next to the evaluation, and the GPU never has to hold an
fp32 copy of the base — and the merged model is then cast and moved to the GPU.

With `push` (output.push) the exported model and its card go to a Hub repository in one commit
after evaluation (storage/hub_push.py); evaluation.json records a complete evaluation so a rerun
after a failed push only pushes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kubetrain_contract import memory
from kubetrain_trainer import card, checkpoint, data, fit, lifetime, model, storage
from kubetrain_trainer.config import MergeConfig
from kubetrain_trainer.stage import InvalidInput, Unhealthy
from kubetrain_trainer.storage import hub_push

log = logging.getLogger(__name__)

#: The merge stage's record of a complete evaluation (of which final model, with what result).
EVALUATION = "evaluation.json"


def eval_device() -> str:
    """Where the model is evaluated: the GPU when the pod has one (the plan gives merge one GPU
    on GPU runs), the CPU otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def perplexity(network: Any, dataset: data.PackedDataset, batch_size: int) -> dict[str, Any]:
    """Token-weighted NLL over the validation split's labelled tokens, and its exponential."""
    if not dataset.rows("validation"):
        return {
            "perplexity": None,
            "evalLoss": None,
            "evalTokens": 0,
            "note": "no validation split",
        }
    device = next(network.parameters()).device
    total, tokens = 0.0, 0
    network.eval()
    with torch.inference_mode():
        for ids, labels, positions in _batches(dataset, batch_size):
            kwargs = {"position_ids": positions.to(device)} if positions is not None else {}
            logits = network(input_ids=ids.to(device), **kwargs).logits.float()
            target = labels[:, 1:].to(device)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1),
                    target.flatten(),
                    ignore_index=data.IGNORE_INDEX,
                    reduction="sum",
                )
            )
            tokens += int((target != data.IGNORE_INDEX).sum())
    loss = total / max(tokens, 1)
    return {"perplexity": math.exp(loss), "evalLoss": loss, "evalTokens": tokens}


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _batches(dataset: data.PackedDataset, batch_size: int) -> Iterator[Batch]:
    """(input_ids, labels, position_ids): stacked blocks, or one prompt → chosen pair at a time
    (labels on the chosen answer only)."""
    if dataset.format == "preference":
        split = dataset.preference_split("validation")
        assert split is not None
        for row in split:
            prompt, chosen = list(row["prompt_ids"]), list(row["chosen_ids"])
            ids = torch.tensor([prompt + chosen])
            labels = torch.tensor([[data.IGNORE_INDEX] * len(prompt) + chosen])
            yield ids, labels, None
        return
    blocks = dataset.split("validation")
    assert blocks is not None
    for start in range(0, len(blocks), batch_size):
        items = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]
        batch = data.stack_blocks([{k: v for k, v in it.items() if k != "row"} for it in items])
        yield batch["input_ids"], batch["labels"], batch.get("position_ids")


def check_memory(config: MergeConfig, model_dir: Path) -> memory.Estimate | None:
    """The device check before the evaluated model is loaded (fit.py): its config.json against
    the GPU's total memory; exit 2 with the operator's message when it cannot fit."""
    shape = fit.shape_of_dir(model_dir, "model.uri")
    return fit.check_device(memory.Setup.from_dict(config.memory.setup), shape, 0)


def refuse_quantized_base(config: MergeConfig, base_dir: Path) -> None:
    uri = config.model.uri
    if config.model.quantized:
        raise InvalidInput(
            f"model.uri: {uri} is declared quantized (model.quantized: true); merging an adapter "
            "into a 4-bit base corrupts the model — point model.uri at the full-precision base, "
            "or set output.merge: false to keep the adapter only"
        )
    declared = model.quantization_of(base_dir)
    if declared is not None:
        raise InvalidInput(
            f"model.uri: {uri} is pre-quantized (config.json quantization_config: {declared}); "
            "merging an adapter into it corrupts the model — point model.uri at the "
            "full-precision base, or set output.merge: false to keep the adapter only"
        )


def refuse_perplexity(config: MergeConfig, numbers: dict[str, Any]) -> None:
    """`output.maxPerplexity`: above it the stage fails (exit 3) with the numbers, and nothing is
    exported; without a validation split there is nothing to compare (exit 2)."""
    limit = config.max_perplexity
    if limit is None:
        return
    found = numbers["perplexity"]
    if found is None:
        raise InvalidInput(
            "maxPerplexity: set, but the dataset has no validation split to measure it on — set "
            "data.validationFraction or data.validation, or unset output.maxPerplexity"
        )
    if found > limit:
        raise Unhealthy(
            f"validation perplexity {found:.3f} on {numbers['evalTokens']} tokens is above "
            f"output.maxPerplexity {limit:g} — the model is not good enough to export; train "
            "longer, on more data, or raise the limit",
            {**numbers, "maxPerplexity": limit, "reason": "PerplexityTooHigh"},
        )


def run(config: MergeConfig, workdir: Path) -> dict[str, Any]:
    """Merge (adapters), evaluate, export, with the output locked (see `lifetime`)."""
    with lifetime.OutputLock(config.output_uri, "merge"):
        return _run(config, workdir)


def _run(config: MergeConfig, workdir: Path) -> dict[str, Any]:
    """Merge (adapters), evaluate, export, push; returns where the model and the numbers went.

    With output.push, a rerun whose evaluation of this final model is complete (evaluation.json)
    only pushes: a failed push never costs a second merge or evaluation."""
    workdir.mkdir(parents=True, exist_ok=True)
    final_uri = storage.join(config.output_uri, "final")
    final_dir = model.local_dir(final_uri, workdir, config.s3, "final model")
    final_meta = checkpoint.read_marker(final_dir)
    if final_meta is None:
        raise InvalidInput(
            f"{final_uri}: no complete final model — the train stage has not finished; run it first"
        )
    identity = hashlib.sha256(json.dumps(final_meta, sort_keys=True).encode()).hexdigest()
    result = _evaluated(config, identity) if config.push is not None else None
    if result is None:
        result = _evaluate(config, workdir, final_uri, final_dir, final_meta)
        record = json.dumps({"final": identity, "result": result}, indent=2)
        storage.write_text(storage.join(config.output_uri, EVALUATION), record, config.s3)
    else:
        log.info("the evaluation of this final model is complete; only pushing")
    if config.push is None:
        return result
    return {**result, **push(config, workdir, result["outputs"], final_meta.get("step"))}


def _evaluated(config: MergeConfig, identity: str) -> dict[str, Any] | None:
    """The result of a complete evaluation of this final model, if a run of the stage wrote it."""
    uri = storage.join(config.output_uri, EVALUATION)
    if not storage.exists(uri, config.s3):
        return None
    record = json.loads(storage.read_text(uri, config.s3))
    return record["result"] if record.get("final") == identity else None


def push(
    config: MergeConfig, workdir: Path, outputs: dict[str, str], step: int | None
) -> dict[str, Any]:
    """output.push: the merged model (else the final one) and the model card, in one commit."""
    assert config.push is not None
    uri = outputs.get("merged", outputs["final"])
    folder = model.local_dir(uri, workdir, config.s3, "the model to push")
    text = storage.read_text(storage.join(config.output_uri, "README.md"), config.s3)
    commit = hub_push.push(
        hub_push.Upload(
            folder,
            text,
            repo=config.push.repo,
            private=config.push.private,
            revision=config.push.revision,
            message=f"kubetrain: {config.run} step {step}",
            skip=lambda path: checkpoint.is_bookkeeping(folder, path),
        )
    )
    log.info("pushed %s to hf://%s@%s", uri, config.push.repo, commit)
    return {"hubRepo": config.push.repo, "hubCommit": commit}


def _evaluate(
    config: MergeConfig,
    workdir: Path,
    final_uri: str,
    final_dir: Path,
    final_meta: dict[str, Any],
) -> dict[str, Any]:
    """Merge (adapters), evaluate, export merged/, metrics.json and the card."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    attention = model.attention(config.attention, "attention (training.attention in the run)")
    is_adapter = (final_dir / "adapter_config.json").exists()
    if is_adapter != (config.adapter.type != "none"):
        raise InvalidInput(
            f"adapter.type: {config.adapter.type}, but {final_uri} holds "
            f"{'an adapter' if is_adapter else 'a full model'} — the stage configs disagree"
        )
    tokenizer = model.load_tokenizer(
        final_dir, "final model", f"{final_uri} is incomplete: run the train stage again"
    )
    dataset = data.open_dataset(config.dataset_pointer, workdir, config.s3)
    dtype = model.DTYPES[config.precision]
    device = eval_device()

    base_uri = config.model.uri or card.FROM_SCRATCH
    outputs = {"final": final_uri}
    network: Any
    if is_adapter:
        from peft import PeftModel

        assert config.model.uri is not None, "adapters are trained on a model from uri"
        base_dir = model.local_dir(config.model.uri, workdir, config.s3, "model.uri")
        check_memory(config, base_dir)
        if config.merge:
            refuse_quantized_base(config, base_dir)
            # The adapter is folded into fp32 weights in host memory (a few small matmuls per
            # layer); only the merged model, in the run's precision, goes to the GPU.
            base = model.load_pretrained(
                base_dir, dtype=torch.float32, attn_implementation=attention
            )
            network = PeftModel.from_pretrained(base, str(final_dir)).merge_and_unload()
        else:
            base = model.load_pretrained(
                base_dir, dtype=dtype, attn_implementation=attention, device=device
            )
            network = PeftModel.from_pretrained(base, str(final_dir))
    else:
        check_memory(config, final_dir)
        network = model.load_pretrained(
            final_dir,
            dtype=dtype,
            attn_implementation=attention,
            device=device,
            what="final model",
            fix=f"{final_uri} is incomplete: run the train stage again",
        )
    network = network.to(device=device, dtype=dtype)
    log.info("evaluating on %s in %s", device, config.precision)
    numbers = {**perplexity(network, dataset, config.micro_batch_size), "evalDevice": device}
    log.info("validation perplexity: %s on %d tokens", numbers["perplexity"], numbers["evalTokens"])

    fields = {
        "run": config.run,
        "summary": f"A {config.method} run of kubetrain"
        + (
            ", adapter merged into the full-precision base." if is_adapter and config.merge else "."
        ),
        "method": config.method,
        "base": base_uri,
        "adapter": config.adapter.type,
        "steps": final_meta.get("step"),
        "dataset": dataset.key,
        "train_tokens": dataset.manifest["splits"]["train"].get("tokens"),
        "block_size": dataset.block_size,
        "perplexity": "n/a" if numbers["perplexity"] is None else f"{numbers['perplexity']:.3f}",
        "eval_tokens": numbers["evalTokens"],
        "precision": config.precision,
    }
    refuse_perplexity(config, numbers)
    if is_adapter and config.merge:
        outputs["merged"] = export(network, tokenizer, fields, config, workdir)
    metrics = {
        **numbers,
        "model": outputs.get("merged", final_uri),
        "base": base_uri,
        "adapter": config.adapter.type,
        "dataset": dataset.key,
    }
    root = config.output_uri
    storage.write_text(storage.join(root, "metrics.json"), json.dumps(metrics, indent=2), config.s3)
    text = card.write(workdir, fields)
    storage.write_text(storage.join(root, "README.md"), text, config.s3)
    return {**numbers, "outputs": outputs}


def export(
    network: Any, tokenizer: Any, fields: dict[str, Any], config: MergeConfig, workdir: Path
) -> str:
    """merged/: safetensors, tokenizer, model card, COMPLETE last (uploaded when remote)."""
    out = checkpoint.ModelDir.of(config.output_uri, "merged", workdir)
    shutil.rmtree(out.building, ignore_errors=True)
    network.save_pretrained(str(out.building), safe_serialization=True)
    tokenizer.save_pretrained(str(out.building))
    card.write(out.building, fields)
    out.publish({"run": config.run}, s3=config.s3, what=f"merged model → {out.uri}", metrics=None)
    log.info("merged model: %s", out.uri)
    return out.uri
