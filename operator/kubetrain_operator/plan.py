"""A TrainingRun → its ordered stages, each with its stage config (the contract's JSON) — pure.

The stage configs are plain dicts here; the trainer validates them with `kubetrain_trainer.config`
(a contract test loads every config this module renders). The DeepSpeed config is generated here so
that the operator, `kubetrain render` and `kubetrain run` all hand the trainer the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetrain_operator.api import (
    Architecture,
    SpecError,
    TrainingRun,
    TrainingRunSpec,
)

STAGE_API_VERSION = "kubetrain.dev/stage-v1"
METRICS_PORT = 9400
#: Where pvc://CLAIM/path URIs are mounted in pods (render adds the volumes).
PVC_MOUNT_ROOT = "/mnt/pvc"
CONFIG_DIR = "/etc/kubetrain"

StageName = Literal["preprocess", "sanity", "train", "merge"]
Target = Literal["cluster", "local"]


@dataclass(frozen=True)
class Stage:
    """One step of a run: what it runs, on how many processes, with which config."""

    name: StageName
    config: dict[str, Any]
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0

    @property
    def distributed(self) -> bool:
        """Training stages run under torchrun in a PyTorchJob; the others are plain Jobs."""
        return self.name in ("sanity", "train")

    @property
    def module_stage(self) -> str:
        """The `python -m kubetrain_trainer <stage>` verb (sanity is a short train)."""
        return "train" if self.name == "sanity" else self.name

    def trainer_args(self, config_path: str, workdir: str) -> list[str]:
        """argv after the interpreter / torchrun: only our own strings, never user input."""
        return [
            "-m",
            "kubetrain_trainer",
            self.module_stage,
            "--config",
            config_path,
            "--workdir",
            workdir,
        ]


@dataclass(frozen=True)
class Plan:
    """Everything a run becomes, before it touches a cluster or a process."""

    run: str
    stages: tuple[Stage, ...]
    output_uri: str
    cache_root: str
    dataset_pointer: str
    preprocess_key: str
    """sha256 of the preprocess config minus run-specific fields: names the preprocess Job."""
    pvc_claims: tuple[str, ...] = field(default=())

    def stage(self, name: StageName) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def plan_run(
    run: TrainingRun,
    *,
    target: Target = "cluster",
    upstream_model: str | None = None,
    base_dir: str | None = None,
    cache_root: str | None = None,
) -> Plan:
    """Stages of a run.

    `upstream_model` is the output model URI of `model.fromRun` (the operator reads it from that
    run's status, `kubetrain` from its file); required for chains. Local runs resolve relative
    paths against `base_dir` and may move the dataset cache to `cache_root`.
    """
    spec = run.spec
    if spec.model.from_run is not None and upstream_model is None:
        raise SpecError(
            "spec.model.fromRun",
            f"the output model of run {spec.model.from_run!r} is not known yet",
            "wait until that run has succeeded (the operator does), or pass its file too",
        )
    uris = _UriMapper(target, base_dir)
    output = uris.map(spec.output.uri.rstrip("/"), "spec.output.uri")
    cache_root = uris.map(
        (cache_root or spec.storage.cache_root or f"{output}/cache").rstrip("/"),
        "spec.storage.cacheRoot",
    )
    common = {
        "apiVersion": STAGE_API_VERSION,
        "run": run.name,
        "metricsPort": METRICS_PORT,
        "s3": {"endpoint": spec.storage.s3.endpoint, "region": spec.storage.s3.region},
    }
    pointer = f"{output}/dataset.json"
    model = _model_source(spec, uris, upstream_model)
    preprocess = _preprocess_config(spec, uris, model, cache_root, pointer, common)
    stages = [Stage("preprocess", preprocess)]
    res = spec.resources
    if spec.sanity is not None:
        gpus = spec.sanity.gpus if spec.sanity.gpus is not None else min(1, res.total_gpus)
        stages.append(
            Stage(
                "sanity",
                _train_config(spec, model, pointer, output, common, sanity_gpus=gpus),
                nodes=1,
                procs_per_node=max(gpus, 1),
                gpus_per_node=gpus,
            )
        )
    stages.append(
        Stage(
            "train",
            _train_config(spec, model, pointer, output, common),
            nodes=res.nodes,
            procs_per_node=max(res.gpus_per_node, 1),
            gpus_per_node=res.gpus_per_node,
        )
    )
    stages.append(
        Stage(
            "merge",
            _merge_config(spec, model, pointer, output, common),
            gpus_per_node=min(res.gpus_per_node, 1),
        )
    )
    return Plan(
        run=run.name,
        stages=tuple(stages),
        output_uri=output,
        cache_root=cache_root,
        dataset_pointer=pointer,
        preprocess_key=_preprocess_key(preprocess),
        pvc_claims=tuple(sorted(uris.claims)),
    )


def upstream_model_uri(upstream: TrainingRun) -> str:
    """Where a finished run leaves the full model a chained run (`fromRun`) starts from."""
    spec = upstream.spec
    if spec.method.adapter.type != "none" and not spec.output.merge:
        raise SpecError(
            "spec.model.fromRun",
            f"run {upstream.name!r} produces only an adapter (adapter {spec.method.adapter.type}, "
            "merge false)",
            f"set output.merge: true on {upstream.name!r}, or chain from a full fine-tune",
        )
    folder = "merged" if spec.output.merge else "final"
    return f"{spec.output.uri.rstrip('/')}/{folder}"


class _UriMapper:
    """pvc://CLAIM/path becomes the path where render mounts the claim; local runs refuse it and
    anchor relative paths at their base directory, so stage processes need no particular cwd."""

    def __init__(self, target: Target, base_dir: str | None = None) -> None:
        self.target, self.base_dir = target, base_dir
        self.claims: set[str] = set()

    def map(self, uri: str, path: str) -> str:
        if uri.startswith("hf://"):
            # The API reserves hf:// (api.md); the stages read only pinned copies, never the Hub.
            raise SpecError(
                path,
                f"{uri!r}: the stages never download from the Hugging Face Hub",
                "download it once (huggingface-cli download ORG/NAME --local-dir DIR), copy it to "
                "s3:// or a PVC and point there",
            )
        if "://" not in uri and self.base_dir is not None:
            return posixpath.normpath(posixpath.join(self.base_dir, uri))
        if not uri.startswith("pvc://"):
            return uri
        if self.target == "local":
            raise SpecError(
                path,
                f"{uri!r}: pvc:// exists only inside a cluster",
                "use a local path or s3:// for `kubetrain run`",
            )
        claim, _, rest = uri.removeprefix("pvc://").partition("/")
        self.claims.add(claim)
        return f"{PVC_MOUNT_ROOT}/{claim}" + (f"/{rest}" if rest else "")

    def map_all(self, uris: list[str], path: str) -> list[str]:
        return [self.map(u, f"{path}[{i}]") for i, u in enumerate(uris)]


def resolved_architecture(arch: Architecture) -> dict[str, Any]:
    """The architecture with its defaults made explicit (kv heads, Llama MLP width)."""
    intermediate = arch.intermediate_size or 64 * math.ceil(arch.hidden_size * 8 / 3 / 64)
    return {
        "family": arch.family,
        "hiddenSize": arch.hidden_size,
        "layers": arch.layers,
        "heads": arch.heads,
        "kvHeads": arch.kv_heads or arch.heads,
        "intermediateSize": intermediate,
        "contextLength": arch.context_length,
        "vocabSize": arch.vocab_size,
        "ropeTheta": arch.rope_theta,
        "tieWordEmbeddings": arch.tie_word_embeddings,
    }


def _model_source(spec: TrainingRunSpec, uris: _UriMapper, upstream: str | None) -> dict[str, Any]:
    if spec.model.architecture is not None:
        return {"architecture": resolved_architecture(spec.model.architecture), "quantized": False}
    uri = spec.model.uri or upstream
    assert uri is not None  # api guarantees exactly one source; fromRun checked above
    return {"uri": uris.map(uri, "spec.model.uri"), "quantized": spec.model.quantized}


def _preprocess_config(
    spec: TrainingRunSpec,
    uris: _UriMapper,
    model: dict[str, Any],
    cache_root: str,
    pointer: str,
    common: dict[str, Any],
) -> dict[str, Any]:
    data, tok = spec.data, spec.tokenizer
    tokenizer: dict[str, Any]
    if tok.train is not None:
        tokenizer = {
            "train": {
                "vocabSize": tok.train.vocab_size,
                "specialTokens": list(tok.train.special_tokens),
                "minFrequency": tok.train.min_frequency,
            }
        }
    else:
        tokenizer = {"uri": uris.map(tok.uri, "spec.tokenizer.uri") if tok.uri else model["uri"]}
    return {
        **common,
        "stage": "preprocess",
        "format": data.format,
        "train": uris.map_all(data.train, "spec.data.train"),
        "validation": uris.map_all(data.validation or [], "spec.data.validation"),
        "validationFraction": data.validation_fraction,
        "fields": {
            "text": data.text_field,
            "messages": data.messages_field,
            "prompt": data.prompt_field,
            "chosen": data.chosen_field,
            "rejected": data.rejected_field,
        },
        "textSplit": data.text_split,
        "chatTemplate": data.chat_template,
        "blockSize": data.block_size,
        "partialBlock": data.partial_block,
        "maxRejectedFraction": data.max_rejected_fraction,
        "tokenizer": tokenizer,
        "cacheRoot": cache_root,
        "datasetPointer": pointer,
        "seed": spec.training.seed,
    }


def _train_config(
    spec: TrainingRunSpec,
    model: dict[str, Any],
    pointer: str,
    output: str,
    common: dict[str, Any],
    *,
    sanity_gpus: int | None = None,
) -> dict[str, Any]:
    t, res = spec.training, spec.resources
    gate = spec.sanity if sanity_gpus is not None else None
    world = max(sanity_gpus or 0, 1) if gate is not None else res.world_size
    epochs: float | None = None
    max_steps, logging_steps = t.max_steps, t.logging_steps
    checkpoints = {"everySteps": spec.checkpoints.every_steps, "keep": spec.checkpoints.keep}
    if gate is not None:
        # The gate needs about ten logged losses to judge a trend, and no checkpoints.
        max_steps, logging_steps = gate.steps, max(1, min(t.logging_steps, gate.steps // 10))
        checkpoints = {"everySteps": gate.steps + 1, "keep": 1}
    elif max_steps is None:
        epochs = t.epochs or 1.0
    return {
        **common,
        "stage": "train" if gate is None else "sanity",
        "method": spec.method.stage,
        "model": model,
        "tokenizerUri": None,
        "datasetPointer": pointer,
        "adapter": _adapter(spec),
        "dpo": _dpo(spec),
        "training": {
            "epochs": epochs,
            "maxSteps": max_steps,
            "learningRate": t.learning_rate,
            "lrScheduler": t.lr_scheduler,
            "warmupRatio": t.warmup_ratio,
            "weightDecay": t.weight_decay,
            "microBatchSize": t.micro_batch_size,
            "gradientAccumulationSteps": t.gradient_accumulation_steps,
            "precision": t.precision,
            "optimizer": t.optimizer,
            "maxGradNorm": t.max_grad_norm,
            "gradientCheckpointing": t.gradient_checkpointing,
            "seed": t.seed,
            "loggingSteps": logging_steps,
            "evalSteps": t.eval_steps,
            "maxGradNormAbort": t.max_grad_norm_abort,
        },
        "checkpoints": checkpoints,
        "distributed": {
            "zeroStage": spec.distributed.zero_stage,
            "deepspeed": deepspeed_config(spec, world),
            "worldSize": world,
        },
        "sanity": None
        if gate is None
        else {
            "minLossDrop": gate.min_loss_drop,
            "maxGradNorm": gate.max_grad_norm,
        },
        "outputUri": output if gate is None else f"{output}/sanity",
    }


def _merge_config(
    spec: TrainingRunSpec, model: dict[str, Any], pointer: str, output: str, common: dict[str, Any]
) -> dict[str, Any]:
    return {
        **common,
        "stage": "merge",
        "method": spec.method.stage,
        "model": model,
        "adapter": _adapter(spec),
        "merge": spec.output.merge,
        "datasetPointer": pointer,
        "outputUri": output,
        "precision": spec.training.precision,
        "microBatchSize": spec.training.micro_batch_size,
    }


def _adapter(spec: TrainingRunSpec) -> dict[str, Any]:
    a = spec.method.adapter
    return {
        "type": a.type,
        "r": a.r,
        "alpha": a.alpha,
        "dropout": a.dropout,
        "targetModules": list(a.target_modules),
    }


def _dpo(spec: TrainingRunSpec) -> dict[str, Any] | None:
    if spec.method.stage != "dpo":
        return None
    d = spec.method.dpo
    return {
        "beta": d.beta if d else 0.1,
        "lossType": d.loss_type if d else "sigmoid",
        "maxPromptLength": d.max_prompt_length if d else None,
    }


def deepspeed_config(spec: TrainingRunSpec, world_size: int) -> dict[str, Any] | None:
    """The DeepSpeed config for ZeRO stages 1–3 (None: plain DDP / one process).

    Batch sizes and clipping are explicit and equal to what the trainer passes to
    TrainingArguments, so HF's consistency check holds and the file documents the run.
    """
    dist, t = spec.distributed, spec.training
    if dist.zero_stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": dist.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if dist.zero_stage == 3:
        zero.update(
            {
                # Without it save_model() writes no weights under ZeRO-3 (only sharded states).
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": 5e8,
                "stage3_param_persistence_threshold": 1e6,
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
            }
        )
    if dist.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if dist.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _preprocess_key(config: dict[str, Any]) -> str:
    """Same data settings → same key, whatever run asks: run-specific fields are left out."""
    relevant = {
        k: v for k, v in config.items() if k not in ("run", "datasetPointer", "metricsPort")
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def stage_config_json(stage: Stage) -> str:
    """Canonical JSON of a stage config (sorted keys): byte-identical across renders."""
    return json.dumps(stage.config, sort_keys=True, indent=2) + "\n"
