"""A TrainingRun → its ordered, complete stages — pure; the final word before any executor.

Each :class:`Stage` carries everything an executor needs: the stage config (the contract's JSON,
with the DeepSpeed config inside), its shape (nodes × processes, GPUs, world size), its resources,
its environment (credentials only as secretKeyRef) and its metrics port. `render` (Kubernetes
objects) and `local` (`kubetrain run`) only consume these fields: neither reads `run.spec` for a
stage, nor rebuilds a config. Every default comes from the API model or, for what a cluster
decides (trainer image and ServiceAccount, pull secrets, dataset cache, S3 endpoint and Secret,
metrics port), from `ClusterDefaults` — applied here and nowhere else, the spec's value first. The
configs spell out each value, so the trainer never falls back on a default of its own
(tests/operator/test_contract.py).

Stages, in order: `preprocess`; `sanity-1` … `sanity-N`, one per rung of the sanity ladder (none
without `spec.sanity`); `train`; `merge` (merge and evaluation).
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from kubetrain_contract import layout, memory
from kubetrain_contract.configs import STAGE_API_VERSION
from kubetrain_contract.durations import duration_seconds
from kubetrain_operator import fit
from kubetrain_operator.api import (
    RUNG_DEFAULTS,
    Architecture,
    DataSpec,
    DPOSettings,
    SanityRung,
    SpecError,
    SpecErrors,
    TrainingRun,
    TrainingRunSpec,
)
from kubetrain_operator.cluster_defaults import DEFAULT_METRICS_PORT, NO_DEFAULTS, ClusterDefaults
from kubetrain_operator.rules import HUB_DATASET_PREFIX

METRICS_PORT = DEFAULT_METRICS_PORT
CONFIG_DIR = "/etc/kubetrain"
#: The pods' writable working directory (an emptyDir: the root filesystem is read-only).
WORKDIR = "/workspace"

Target = Literal["cluster", "local"]
Kind = Literal["Job", "PyTorchJob"]
StageRole = Literal["preprocess", "sanity", "train", "merge"]
"""What a stage is for: the lifecycle, render and the local executor dispatch on it, never on
the stage's name (sanity rungs are `sanity-<i>`, and names may change; roles do not)."""
STAGE_ROLES: tuple[StageRole, ...] = get_args(StageRole)
Env = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """One step of a run, complete: what it runs, where, on how many processes, with what."""

    name: str
    """preprocess, sanity-<i> (1-based), train or merge."""
    role: StageRole
    kind: Kind
    """Job (one process) or PyTorchJob (torchrun on every node)."""
    config: dict[str, Any]
    """The stage config JSON (for training: with the DeepSpeed config inside)."""
    nodes: int
    procs_per_node: int
    gpus_per_node: int
    world_size: int
    resources: dict[str, dict[str, str]]
    """Kubernetes requests/limits per pod (the GPU under its extended resource name)."""
    env: tuple[Env, ...]
    """Kubernetes env entries; credentials only as valueFrom.secretKeyRef."""
    metrics_port: int
    summary: str
    """One line for humans: what the stage does and on what (shown by render and run)."""
    rung: int | None = None
    """The sanity rung (1-based) of a sanity stage."""
    deadline_seconds: int | None = None
    """The Job's activeDeadlineSeconds (spec.stageDeadline); None: no deadline (the attempts of
    training have the stall check instead)."""

    @property
    def distributed(self) -> bool:
        return self.kind == "PyTorchJob"

    @property
    def module_stage(self) -> str:
        """The `python -m kubetrain_trainer <stage>` verb (a sanity rung is a short train)."""
        return "train" if self.role == "sanity" else self.role

    @property
    def config_file(self) -> str:
        return f"{self.name}.json"

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
    target: Target
    stages: tuple[Stage, ...]
    output_uri: str
    cache_root: str
    dataset_pointer: str
    preprocess_key: str
    """sha256 of the preprocess config minus run-specific fields: names the preprocess Job."""
    image: str = NO_DEFAULTS.trainer_image
    """spec.image, else the cluster's trainer image."""
    service_account: str | None = None
    """The cluster's trainer ServiceAccount (None: the namespace's default account)."""
    image_pull_secrets: tuple[str, ...] = ()
    queue_name: str | None = None
    suspend: bool = False
    shared_memory: str = "8Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    pvc_claims: tuple[str, ...] = ()
    fit_report: fit.FitReport | None = None
    """Every stage's memory estimate, when the model's size was known while planning (else the
    preprocess stage makes it: its config's `fit`)."""

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def sanity_stages(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.role == "sanity")

    def public_uri(self, path: str) -> str:
        """A location as the user wrote it: the in-pod mount of a claim back to pvc://CLAIM/….

        Stage results name paths as the stage saw them; status and chained runs need URIs that
        mean something outside the pod (and that `plan_run` accepts as `fromRun` models)."""
        prefix = f"{layout.PVC_MOUNT_ROOT}/"
        if self.target != "cluster" or not path.startswith(prefix):
            return path
        claim, _, rest = path.removeprefix(prefix).partition("/")
        if claim not in self.pvc_claims:
            return path
        return f"pvc://{claim}" + (f"/{rest}" if rest else "")


def plan_run(
    run: TrainingRun,
    *,
    target: Target = "cluster",
    upstream_model: str | None = None,
    base_dir: str | None = None,
    cache_root: str | None = None,
    metrics_port: int | None = None,
    local_procs: int | None = None,
    defaults: ClusterDefaults = NO_DEFAULTS,
    model_shape: memory.ModelShape | None = None,
    check_fit: bool = True,
) -> Plan:
    """Stages of a run for a target.

    `upstream_model` is the output model URI of `model.fromRun` (the operator reads it from that
    run's status, `kubetrain` from its file); required for chains. Local runs resolve relative
    paths against `base_dir`, may move the dataset cache to `cache_root`, serve metrics on
    `metrics_port` and train with `local_procs` processes (default: one node's GPUs, or one).
    A cluster refuses local paths (a pod cannot read them); local runs refuse pvc://.
    `defaults` fill what the spec leaves unset (the spec's value always wins).
    `model_shape` is the size of a `model.uri` its caller could read (a local config.json); a stage
    that cannot fit the GPU refuses the plan unless `check_fit` is False (`kubetrain fit`).
    """
    spec = run.spec
    if spec.model.from_run is not None and upstream_model is None:
        raise SpecError(
            "spec.model.fromRun",
            f"the output model of run {spec.model.from_run!r} is not known yet",
            "wait until that run has succeeded (the operator does), or pass its file too",
        )
    uris = _UriMapper(target, base_dir)
    raw_output = spec.output.uri.rstrip("/")
    output = uris.map(raw_output, "spec.output.uri")
    raw_cache = (
        cache_root or spec.storage.cache_root or defaults.cache_root or f"{raw_output}/cache"
    )
    where = "spec.storage.cacheRoot" if spec.storage.cache_root else "spec.output.uri"
    cache = uris.map(raw_cache.rstrip("/"), where if cache_root is None else "--cache-dir")
    if metrics_port is None:
        metrics_port = defaults.metrics_port
    s3 = spec.storage.s3
    own_endpoint = bool(s3.endpoint)
    common = {
        "apiVersion": STAGE_API_VERSION,
        "run": run.name,
        "metricsPort": metrics_port,
        "s3": {
            "endpoint": s3.endpoint if own_endpoint else defaults.s3_endpoint,
            "region": s3.region,
            "allowInsecureEndpoint": s3.allow_insecure_endpoint
            if own_endpoint
            else defaults.s3_allow_insecure_endpoint,
        },
    }
    pointer = f"{output}/dataset.json"
    model = _model_source(spec, uris, upstream_model)
    preprocess = _preprocess_config(spec, uris, model, cache, pointer, common)
    shape = _Shapes(spec, target, local_procs)
    reads_s3 = any(
        str(uri).startswith("s3://")
        for uri in (
            spec.model.uri,
            upstream_model,
            spec.tokenizer.uri,
            raw_output,
            raw_cache,
            *spec.data.uris(),
        )
    )
    s3_secret = s3.secret_name or (defaults.s3_secret_name if reads_s3 else None)
    env = _env(spec, target, s3_secret)
    res = spec.resources
    deadline = int(duration_seconds(spec.stage_deadline))
    pod_memory = (
        None
        if res.memory is None
        else fit.Capacity(memory.quantity_bytes(res.memory), "resources.memory")
    )
    gauge = _Gauge(fit.capacity(spec, defaults), pod_memory)
    stages = [
        Stage(
            "preprocess",
            "preprocess",
            "Job",
            preprocess,
            *shape.single(0),
            resources=_resources(res.preprocess.cpu, res.preprocess.memory, res.gpu_resource, 0),
            env=env,
            metrics_port=metrics_port,
            summary="read, check, tokenize and pack the data on CPU (never a GPU)",
            deadline_seconds=deadline,
        )
    ]

    def training_config(
        name: str, procs: int, gpus: int, world: int, rung: tuple[int, SanityRung] | None = None
    ) -> dict[str, Any]:
        """A sanity rung's or the training stage's config, with its memory setup."""
        setup = fit.setup(spec, stage=name, world=world, procs_per_node=procs, gpus=gpus, rung=rung)
        section = gauge.section(setup)
        return _train_config(
            spec, model, pointer, output, common, world, rung=rung, memory_section=section
        )

    for index, rung in enumerate(spec.sanity.ladder if spec.sanity else (), start=1):
        gpus = rung.gpus if rung.gpus is not None else min(1, res.total_gpus)
        nodes, procs, gpn, world = shape.rung(gpus)
        stages.append(
            Stage(
                f"sanity-{index}",
                "sanity",
                "PyTorchJob",
                training_config(f"sanity-{index}", procs, gpn, world, (index, rung)),
                nodes,
                procs,
                gpn,
                world,
                resources=_resources(res.cpu, res.memory, res.gpu_resource, gpn),
                env=env,
                metrics_port=metrics_port,
                summary=f"sanity rung {index}: {_steps(rung)} steps on {_on(gpus)}",
                rung=index,
            )
        )
    nodes, procs, gpn, world = shape.train()
    stages.append(
        Stage(
            "train",
            "train",
            "PyTorchJob",
            training_config("train", procs, gpn, world),
            nodes,
            procs,
            gpn,
            world,
            resources=_resources(res.cpu, res.memory, res.gpu_resource, gpn),
            env=env,
            metrics_port=metrics_port,
            summary=f"train on {nodes} node(s) × {procs} process(es)"
            + (
                f", DeepSpeed ZeRO-{spec.distributed.zero_stage}"
                if spec.distributed.zero_stage
                else ""
            ),
        )
    )
    uris.raise_problems()
    merge_gpus = res.merge_gpus
    stages.append(
        Stage(
            "merge",
            "merge",
            "Job",
            _merge_config(
                spec,
                model,
                pointer,
                output,
                common,
                gauge.section(
                    fit.setup(spec, stage="merge", world=1, procs_per_node=1, gpus=merge_gpus)
                ),
            ),
            *shape.single(merge_gpus),
            resources=_resources(res.merge.cpu, res.merge.memory, res.gpu_resource, merge_gpus),
            env=env,
            metrics_port=metrics_port,
            summary=("merge the adapter and " if spec.output.merge else "")
            + f"evaluate on {'1 GPU' if merge_gpus else 'CPU'}"
            + ("" if merge_gpus or res.gpus_per_node == 0 else " (resources.merge.gpus is 0)"),
            deadline_seconds=deadline,
        )
    )
    sized = model_shape
    vocabulary = fit.known_vocabulary(spec)
    if model["architecture"] is not None and vocabulary is not None:
        sized = memory.ModelShape.from_architecture(model["architecture"], vocabulary)
    report = gauge.report(sized)
    if report is not None and report.refusals and check_fit:
        raise fit.DoesNotFit([SpecError(path, message) for path, message in report.refusals])
    if sized is None and gauge.capacity is not None and gauge.setups:
        # Only the model's config.json (or the tokenizer) knows the size: the preprocess stage
        # reads it on CPU and refuses before it tokenizes anything.
        preprocess["fit"] = {
            "gpuMemoryBytes": gauge.capacity.bytes,
            "gpuMemorySource": gauge.capacity.source,
            "modelUri": model["uri"],
            "architecture": model["architecture"],
            "setups": [s.to_dict() for s in gauge.setups],
        }
    return Plan(
        run=run.name,
        target=target,
        stages=tuple(stages),
        output_uri=output,
        cache_root=cache,
        dataset_pointer=pointer,
        preprocess_key=_preprocess_key(preprocess),
        image=spec.image or defaults.trainer_image,
        service_account=defaults.trainer_service_account,
        image_pull_secrets=defaults.image_pull_secrets,
        queue_name=spec.queue_name,
        suspend=spec.suspend,
        shared_memory=res.shared_memory,
        node_selector=dict(sorted(res.node_selector.items())),
        tolerations=tuple(t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations),
        pvc_claims=tuple(sorted(uris.claims)),
        fit_report=report,
    )


class _Gauge:
    """Collects the stages' memory setups while planning, and writes each stage's `memory`."""

    def __init__(self, capacity: fit.Capacity | None, pod_memory: fit.Capacity | None) -> None:
        self.capacity, self.pod_memory = capacity, pod_memory
        self.setups: list[memory.Setup] = []

    def section(self, setup: memory.Setup) -> dict[str, Any]:
        self.setups.append(setup)
        cap = self.capacity
        return {
            "setup": setup.to_dict(),
            "gpuMemoryBytes": cap.bytes if cap else None,
            "gpuMemorySource": cap.source if cap else None,
        }

    def report(self, shape: memory.ModelShape | None) -> fit.FitReport | None:
        if shape is None:
            return None
        return fit.report(self.setups, shape, self.capacity, self.pod_memory)


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


def _steps(rung: SanityRung) -> int:
    return rung.steps if rung.steps is not None else int(RUNG_DEFAULTS["steps"])


def _on(gpus: int) -> str:
    return "CPU (one process)" if gpus == 0 else f"{gpus} GPU(s)"


class _Shapes:
    """(nodes, processes per node, GPUs per node, world size) of each stage, per target."""

    def __init__(self, spec: TrainingRunSpec, target: Target, local_procs: int | None) -> None:
        self.res, self.target, self.local_procs = spec.resources, target, local_procs

    def single(self, gpus: int) -> tuple[int, int, int, int]:
        return 1, 1, gpus, 1

    def rung(self, gpus: int) -> tuple[int, int, int, int]:
        per_node = self.res.gpus_per_node
        if gpus == 0:
            return 1, 1, 0, 1
        if gpus <= per_node or self.target == "local":
            return 1, gpus, gpus, gpus
        nodes = gpus // per_node  # the rules allow only whole nodes beyond one
        return nodes, per_node, per_node, gpus

    def train(self) -> tuple[int, int, int, int]:
        gpus = self.res.gpus_per_node
        procs = max(gpus, 1)
        if self.target == "local":
            procs = self.local_procs or procs
            return 1, procs, gpus, procs
        return self.res.nodes, procs, gpus, self.res.nodes * procs


def _resources(
    cpu: str | None, memory: str | None, gpu_resource: str, gpus: int
) -> dict[str, dict[str, str]]:
    """Requests equal to limits (Guaranteed QoS where both are set); a GPU only when asked."""
    amounts: dict[str, str] = {}
    if cpu is not None:
        amounts["cpu"] = cpu
    if memory is not None:
        amounts["memory"] = memory
    if gpus:
        amounts[gpu_resource] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _env(spec: TrainingRunSpec, target: Target, s3_secret: str | None) -> tuple[Env, ...]:
    """Environment of every stage process: caches on the pod's emptyDir, credentials by reference
    only. Local runs use the caller's environment (and credentials) as they are."""
    hub = spec.uses_hub()
    env: list[Env] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Kernels come only from the image: transformers' switch for Hub kernels (the trainer
        # sets it in its own process too and refuses the `kernels` package's Hub loaders).
        {"name": layout.HUB_KERNELS_ENV, "value": "NO"},
    ]
    if target == "cluster":
        env += [
            {"name": "HOME", "value": WORKDIR},
            {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
            {"name": "TORCH_EXTENSIONS_DIR", "value": f"{WORKDIR}/.cache/torch_extensions"},
            {"name": "TRITON_CACHE_DIR", "value": f"{WORKDIR}/.cache/triton"},
            {"name": "KUBETRAIN_LOG_FORMAT", "value": "json"},
        ]
    if not hub:
        # Nothing of this run comes from the Hugging Face Hub: never let a library try.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    hf = spec.storage.hf
    if hub and hf.endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf.endpoint})
    if target == "local":
        return tuple(env)
    if hub and hf.secret_name:
        env.append(_secret_env("HF_TOKEN", hf.secret_name, hf.token_key))
    s3 = spec.storage.s3
    if s3_secret:
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", s3_secret, s3.access_key_id_key),
            _secret_env("AWS_SECRET_ACCESS_KEY", s3_secret, s3.secret_access_key_key),
        ]
    return tuple(env)


def _secret_env(name: str, secret: str, key: str) -> Env:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


class _UriMapper:
    """pvc://CLAIM/path becomes the path where render mounts the claim; a cluster refuses local
    paths, local runs refuse pvc:// and anchor relative paths at their base directory, so stage
    processes need no particular cwd. s3:// and hf:// pass through."""

    def __init__(self, target: Target, base_dir: str | None = None) -> None:
        self.target, self.base_dir = target, base_dir
        self.claims: set[str] = set()
        self.problems: list[SpecError] = []

    def map(self, uri: str, path: str) -> str:
        """The URI as the stage sees it; a refusal is collected (see :meth:`raise_problems`)."""
        try:
            return self._map(uri, path)
        except SpecError as error:
            if all(str(p) != str(error) for p in self.problems):
                self.problems.append(error)
            return uri

    def raise_problems(self) -> None:
        if self.problems:
            raise SpecErrors(self.problems) if len(self.problems) > 1 else self.problems[0]

    def _map(self, uri: str, path: str) -> str:
        if uri.startswith(("s3://", "hf://")):
            return uri
        if uri.startswith("pvc://"):
            if self.target == "local":
                raise SpecError(
                    path,
                    "pvc:// exists only inside a cluster",
                    "use a local path or s3:// for `kubetrain run`",
                )
            claim, _, rest = uri.removeprefix("pvc://").partition("/")
            self.claims.add(claim)
            return f"{layout.PVC_MOUNT_ROOT}/{claim}" + (f"/{rest}" if rest else "")
        local = uri.removeprefix("file://")
        if self.target == "cluster":
            raise SpecError(
                path,
                "is a local path: a pod in the cluster cannot read it",
                "use pvc://CLAIM/path (a PersistentVolumeClaim) or s3://BUCKET/path; "
                "local paths work with `kubetrain run`",
            )
        if self.base_dir is not None and not posixpath.isabs(local):
            joined = posixpath.normpath(posixpath.join(self.base_dir, local))
            # normpath drops a trailing "/", which is what makes a data URI a prefix
            return joined + "/" if local.endswith("/") and joined != "/" else joined
        return local

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
        return {
            "uri": None,
            "architecture": resolved_architecture(spec.model.architecture),
            "quantized": False,
        }
    uri = spec.model.uri or upstream
    assert uri is not None  # api guarantees exactly one source; fromRun checked above
    where = "spec.model.uri" if spec.model.uri else "spec.model.fromRun"
    return {"uri": uris.map(uri, where), "architecture": None, "quantized": spec.model.quantized}


def _sources(data: DataSpec, uris: _UriMapper) -> list[dict[str, Any]]:
    """Every input as a SourceConfig: plain data.train[i] is `train-<i>` without terms."""
    return [
        {
            "name": source.name,
            "split": split,
            "uri": uris.map(source.uri, where),
            "exclude": list(source.exclude),
            "fraction": source.fraction,
            "maxRows": source.max_rows,
            "optional": source.optional,
            "maxRejectedFraction": source.max_rejected_fraction,
            "hub": {
                "config": source.config,
                "split": source.split,
                "files": list(source.files or []),
            }
            if source.uri.startswith(HUB_DATASET_PREFIX)
            else None,
        }
        for split, source, where in data.all_sources()
    ]


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
            "uri": None,
            "train": {
                "vocabSize": tok.train.vocab_size,
                "specialTokens": list(tok.train.special_tokens),
                "minFrequency": tok.train.min_frequency,
            },
        }
    else:
        uri = uris.map(tok.uri, "spec.tokenizer.uri") if tok.uri else model["uri"]
        tokenizer = {"uri": uri, "train": None}
    return {
        **common,
        "stage": "preprocess",
        "format": data.format,
        "sources": _sources(data, uris),
        "validationFraction": data.validation_fraction,
        "fields": {
            "text": data.text_field,
            "messages": data.messages_field,
            "prompt": data.prompt_field,
            "chosen": data.chosen_field,
            "rejected": data.rejected_field,
        },
        "textSplit": data.text_split,
        "documentSeparator": data.document_separator,
        "crossDocumentAttention": data.packing.cross_document_attention,
        "chatTemplate": data.chat_template,
        "blockSize": data.block_size,
        "partialBlock": data.partial_block,
        "maxRejectedFraction": data.max_rejected_fraction,
        "tokenizer": tokenizer,
        "cacheRoot": cache_root,
        "datasetPointer": pointer,
        "seed": spec.training.seed,
        "workers": None,
        "fit": None,
    }


def _train_config(
    spec: TrainingRunSpec,
    model: dict[str, Any],
    pointer: str,
    output: str,
    common: dict[str, Any],
    world: int,
    *,
    memory_section: dict[str, Any],
    rung: tuple[int, SanityRung] | None = None,
) -> dict[str, Any]:
    t, dist = spec.training, spec.distributed
    epochs: float | None = None
    max_steps, logging_steps = t.max_steps, t.logging_steps
    checkpoints = {"everySteps": spec.checkpoints.every_steps, "keep": spec.checkpoints.keep}
    zero_stage, optimizer, micro = dist.zero_stage, t.optimizer, t.micro_batch_size
    offload = dist.offload
    gate: dict[str, Any] | None = None
    out = output
    if rung is not None:
        index, r = rung
        steps = _steps(r)
        # A rung needs about ten logged losses to judge a trend, and no checkpoints.
        max_steps, logging_steps = steps, max(1, min(t.logging_steps, steps // 10))
        checkpoints = {"everySteps": steps + 1, "keep": 1}
        zero_stage = dist.zero_stage if r.zero_stage is None else r.zero_stage
        optimizer = r.optimizer or t.optimizer
        micro = r.micro_batch_size or t.micro_batch_size
        offload = r.offload or dist.offload
        gate = {
            "minLossDrop": r.min_loss_drop
            if r.min_loss_drop is not None
            else RUNG_DEFAULTS["min_loss_drop"],
            "maxGradNorm": r.max_grad_norm
            if r.max_grad_norm is not None
            else RUNG_DEFAULTS["max_grad_norm"],
        }
        out = f"{output}/sanity/{index}"
    elif max_steps is None:
        epochs = t.epochs or 1.0
    return {
        **common,
        "stage": "train" if rung is None else "sanity",
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
            "microBatchSize": micro,
            "gradientAccumulationSteps": t.gradient_accumulation_steps,
            "precision": t.precision,
            "optimizer": optimizer,
            "maxGradNorm": t.max_grad_norm,
            "gradientCheckpointing": t.gradient_checkpointing,
            "weightPrecision": t.weight_precision,
            "attention": t.attention,
            "compile": t.compile,
            "seed": t.seed,
            "loggingSteps": logging_steps,
            "evalSteps": t.eval_steps,
            "maxGradNormAbort": t.max_grad_norm_abort,
        },
        "checkpoints": checkpoints,
        "distributed": {
            "zeroStage": zero_stage,
            "deepspeed": deepspeed_config(zero_stage, offload),
            "worldSize": world,
        },
        "sanity": gate,
        "outputUri": out,
        "memory": memory_section,
    }


def _merge_config(
    spec: TrainingRunSpec,
    model: dict[str, Any],
    pointer: str,
    output: str,
    common: dict[str, Any],
    memory_section: dict[str, Any],
) -> dict[str, Any]:
    return {
        **common,
        "stage": "merge",
        "method": spec.method.stage,
        "model": model,
        "adapter": _adapter(spec),
        "merge": spec.output.merge,
        "maxPerplexity": spec.output.max_perplexity,
        "push": _push(spec),
        "datasetPointer": pointer,
        "outputUri": output,
        "precision": spec.training.precision,
        "microBatchSize": spec.training.micro_batch_size,
        "attention": spec.training.attention,
        "memory": memory_section,
    }


def _push(spec: TrainingRunSpec) -> dict[str, Any] | None:
    push = spec.output.push
    if push is None:
        return None
    return {"repo": push.hub, "private": push.private, "revision": push.revision}


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
    d = spec.method.dpo or DPOSettings()
    return {
        "beta": d.beta,
        "lossType": d.loss_type,
        "maxPromptLength": d.max_prompt_length,
        "precomputeReferenceLogProbs": d.precompute_reference_log_probs,
    }


#: DeepSpeed keys the transformers integration fills from TrainingArguments and the model
#: (`HfTrainerDeepSpeedConfig`): batch sizes, clipping, precision, bucket sizes. "auto" keeps one
#: source for each (the stage config) and makes the DeepSpeed config independent of the world size.
AUTO = "auto"


def deepspeed_config(zero_stage: int, offload: str) -> dict[str, Any] | None:
    """The DeepSpeed config for ZeRO stages 1–3 (None: plain DDP / one process).

    Offload applies from stage 2 (a sanity rung may run a lower stage than the run: no offload).
    """
    if zero_stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": AUTO,
    }
    if zero_stage == 3:
        zero.update(
            {
                # Without it save_model() writes no weights under ZeRO-3 (only sharded states).
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": AUTO,
                "stage3_param_persistence_threshold": AUTO,
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
            }
        )
    if offload == "cpu" and zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "train_batch_size": AUTO,
        "gradient_clipping": AUTO,
        "zero_optimization": zero,
        "bf16": {"enabled": AUTO},
        "fp16": {
            "enabled": AUTO,
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
        k: v for k, v in config.items() if k not in ("run", "datasetPointer", "metricsPort", "fit")
    }
    # The dataset does not depend on the order sources are listed in (the stage sorts them).
    relevant["sources"] = sorted(config["sources"], key=lambda s: (s["split"], s["name"]))
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def stage_config_json(stage: Stage) -> str:
    """Canonical JSON of a stage config (sorted keys): byte-identical across renders."""
    return json.dumps(stage.config, sort_keys=True, indent=2) + "\n"
