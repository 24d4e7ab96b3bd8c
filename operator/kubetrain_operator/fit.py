"""Does every stage fit its GPU? The plan's side of the memory model — pure.

`plan` builds each training and merge stage's `memory.Setup` here (one place turns the spec's
settings, a rung's overrides applied, into what the model counts) and writes it into the stage
config, where the trainer re-checks it against the real device. When the model's size is known
while planning (model.architecture with a known vocabulary, or a local model directory whose
config.json the caller read) every stage is estimated now and a stage that cannot fit refuses the
run before anything runs; otherwise the preprocess stage, on CPU, reads the model's config.json
and does the same before it tokenizes anything (docs/fit.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetrain_contract import memory
from kubetrain_operator.api import SanityRung, SpecErrors, TrainingRunSpec
from kubetrain_operator.cluster_defaults import ClusterDefaults


class DoesNotFit(SpecErrors):
    """Stages whose estimate exceeds their GPU (or whose offload exceeds the pod's memory): the
    operator reports them with reason DoesNotFit, `kubetrain validate` like any spec problem."""


@dataclass(frozen=True)
class Capacity:
    """One GPU's memory and where the number came from (said in every refusal)."""

    bytes: int
    source: str


def capacity(spec: TrainingRunSpec, defaults: ClusterDefaults) -> Capacity | None:
    """resources.gpuMemory, else the nodeSelector's GPU Feature Discovery labels, else the
    cluster's default; None: nothing says, no fit check."""
    res = spec.resources
    if res.gpu_memory is not None:
        return Capacity(memory.quantity_bytes(res.gpu_memory), "resources.gpuMemory")
    labelled = memory.gpu_memory_from_labels(res.node_selector)
    if labelled is not None:
        return Capacity(*labelled)
    if defaults.gpu_memory is not None:
        return Capacity(
            memory.quantity_bytes(defaults.gpu_memory), "the cluster default trainer.gpuMemory"
        )
    return None


def known_vocabulary(spec: TrainingRunSpec) -> int | None:
    """A model built from scratch has the vocabulary it declares or its trained tokenizer's;
    None: only the tokenizer at tokenizer.uri knows (the preprocess stage sizes the model)."""
    arch, trained = spec.model.architecture, spec.tokenizer.train
    if arch is not None and arch.vocab_size is not None:
        return arch.vocab_size
    return trained.vocab_size if trained is not None else None


def setup(
    spec: TrainingRunSpec,
    *,
    stage: str,
    world: int,
    procs_per_node: int,
    gpus: int,
    rung: tuple[int, SanityRung] | None = None,
) -> memory.Setup:
    """What one process of a train, sanity or merge stage holds, from the spec (and the rung)."""
    t, dist, adapter = spec.training, spec.distributed, spec.method.adapter
    where, zero, optimizer, micro = "spec", dist.zero_stage, t.optimizer, t.micro_batch_size
    offload = dist.offload == "cpu"
    prefix = "spec.training"
    paths = {
        "micro_batch_size": f"{prefix}.microBatchSize",
        "optimizer": f"{prefix}.optimizer",
        "zero_stage": "spec.distributed.zeroStage",
        "offload": "spec.distributed.offload",
    }
    if rung is not None:
        index, r = rung
        where = (
            f"spec.sanity.rungs[{index - 1}]"
            if spec.sanity and spec.sanity.rungs
            else "spec.sanity"
        )
        zero = dist.zero_stage if r.zero_stage is None else r.zero_stage
        optimizer = r.optimizer or t.optimizer
        micro = r.micro_batch_size or t.micro_batch_size
        offload = (r.offload or dist.offload) == "cpu"
        paths.update(
            {
                "micro_batch_size": f"{where}.microBatchSize",
                "optimizer": f"{where}.optimizer",
                "zero_stage": f"{where}.zeroStage",
                "offload": f"{where}.offload",
            }
        )
    elif stage == "train":
        where = "spec.training"
    mode: memory.Mode = "train"
    if stage == "merge":
        where, mode, zero, offload, world = "spec.resources.merge", "eval", 0, False, 1
    dpo = spec.method.dpo
    reference: Literal["none", "model", "precomputed"] = "none"
    if spec.method.stage == "dpo" and adapter.type == "none":
        reference = "precomputed" if dpo and dpo.precompute_reference_log_probs else "model"
    return memory.Setup(
        stage=stage,
        where=where,
        mode=mode,
        method=spec.method.stage,
        adapter=adapter.type,
        lora_r=adapter.r,
        target_modules=tuple(adapter.target_modules),
        precision=t.precision,
        weight_precision=t.weight_precision,
        optimizer=optimizer,
        zero_stage=zero,
        offload=offload and zero >= 2,
        world_size=world,
        procs_per_node=procs_per_node,
        micro_batch_size=micro,
        block_size=spec.data.block_size,
        gradient_checkpointing=t.gradient_checkpointing,
        attention=t.attention,
        compile=t.compile,
        reference=reference,
        gpu=gpus > 0,
        paths={
            **paths,
            "attention": f"{prefix}.attention",
            "reference": "spec.method.dpo.precomputeReferenceLogProbs",
            "weight_precision": f"{prefix}.weightPrecision",
            "gradient_checkpointing": f"{prefix}.gradientCheckpointing",
        },
    )


@dataclass(frozen=True)
class FitReport:
    """Every estimated stage, and the refusals of those that do not fit."""

    rows: tuple[dict[str, Any], ...]
    refusals: tuple[tuple[str, str], ...]
    """(spec path, message) of each stage over the GPU's memory."""
    capacity: Capacity | None
    shape: memory.ModelShape


def report(
    setups: list[memory.Setup],
    shape: memory.ModelShape,
    cap: Capacity | None,
    pod_memory: Capacity | None = None,
) -> FitReport:
    """Estimate each setup; refuse those on GPUs over the capacity, and those whose offloaded
    state (per process, times the processes of a pod) exceeds the training pod's memory."""
    rows, refusals = [], []
    for s in setups:
        estimate = memory.estimate(shape, s)
        rows.append(memory.row(estimate, cap.bytes if cap else None))
        if cap is not None and s.gpu and estimate.total > cap.bytes:
            refusals.append((s.where, memory.refusal(estimate, shape, cap.bytes, cap.source)))
        offloaded = estimate.host_total * s.procs_per_node
        if pod_memory is not None and s.mode == "train" and offloaded > pod_memory.bytes:
            refusals.append(
                (
                    s.where,
                    f"{s.stage} offloads about {memory.gib(offloaded)} per pod to RAM "
                    f"({memory.gib(estimate.host_total)} per process × {s.procs_per_node}), the "
                    f"pod has {memory.gib(pod_memory.bytes)} ({pod_memory.source}) — raise "
                    "resources.memory, or offload less (more GPUs, or offload: none)",
                )
            )
    return FitReport(rows=tuple(rows), refusals=tuple(refusals), capacity=cap, shape=shape)


def table(rep: FitReport) -> list[str]:
    """`kubetrain fit`'s table: one line per stage, the largest terms, fits or not."""
    cap, shape = rep.capacity, rep.shape
    head = f"model: {shape.parameters / 1e9:.2f}B parameters; GPU: " + (
        f"{memory.gib(cap.bytes)} ({cap.source})" if cap else "unknown (no fit check)"
    )
    lines = [head, f"{'STAGE':<10} {'PROCS':>5} {'PER PROCESS':>12}  {'FITS':<4}  LARGEST TERMS"]
    for r in rep.rows:
        fits = {True: "yes", False: "NO", None: "-"}[r["fits"]]
        where = "" if r["device"] == "gpu" else " (CPU)"
        largest = ", ".join(f"{name} {memory.gib(n)}" for name, n in r["largest"])
        host = f"; offloaded {memory.gib(r['hostBytes'])}" if r["hostBytes"] else ""
        lines.append(
            f"{r['stage']:<10} {r['worldSize']:>5} {memory.gib(r['estimateBytes']):>12}  "
            f"{fits:<4}  {largest}{host}{where}"
        )
    return lines
