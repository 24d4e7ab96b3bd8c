"""TrainingRun documents for the plan/render/contract/CLI tests, and small walkers over them.

Everything here is input or plumbing, never an expected value: the examples are read from
`examples/` as plain YAML, variants are those documents with a few fields changed, and the tests
derive what they expect from the documents (and docs/api.md, docs/architecture.md), not from `plan`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kubetrain_operator.api import TrainingRun, parse_run
from kubetrain_operator.plan import Plan, Target, plan_run, upstream_model_uri
from kubetrain_operator.render import render_all

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
EXAMPLE_NAMES = [p.stem for p in EXAMPLE_FILES]
DELETE = object()
"""A value for :func:`changed` that removes the field."""


def example(name: str) -> dict[str, Any]:
    """The example document `examples/<name>.yaml`, as plain data."""
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))


def changed(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `doc` with dotted paths set (intermediate mappings created) or deleted."""
    out = copy.deepcopy(doc)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return out


def upstream_docs() -> dict[str, dict[str, Any]]:
    """Every example by run name: where a `fromRun` chain looks for its upstream."""
    docs = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in EXAMPLE_FILES]
    return {d["metadata"]["name"]: d for d in docs}


def planned(
    doc: dict[str, Any], *, target: Target = "cluster", upstream: dict[str, Any] | None = None
) -> tuple[TrainingRun, Plan]:
    """Parse and plan a document; a `fromRun` chain gets its upstream from `upstream` or the
    examples (the URI itself is checked separately in test_plan)."""
    run = parse_run(doc)
    model = None
    if run.spec.model.from_run is not None:
        up = upstream or upstream_docs()[run.spec.model.from_run]
        model = upstream_model_uri(parse_run(up))
    return run, plan_run(run, target=target, upstream_model=model)


def rendered(doc: dict[str, Any], namespace: str = "ml", **kwargs: Any) -> list[dict[str, Any]]:
    """Every object the document becomes."""
    run, plan = planned(doc, **kwargs)
    return render_all(run, plan, namespace=namespace)


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(role, pod template) of a Job (role "Job") or a PyTorchJob (Master, Worker)."""
    if obj["kind"] == "Job":
        return [("Job", obj["spec"]["template"])]
    if obj["kind"] == "PyTorchJob":
        return [(role, r["template"]) for role, r in obj["spec"]["pytorchReplicaSpecs"].items()]
    return []


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *pod_spec.get("initContainers", []),
        *pod_spec.get("containers", []),
        *pod_spec.get("ephemeralContainers", []),
    ]


def string_leaves(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, string) for every string in a JSON-like tree, mapping keys included."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{{key}}", str(key)
            yield from string_leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from string_leaves(item, f"{path}[{index}]")


def stage_configs(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The ConfigMap's files (name → JSON text)."""
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    return dict(config_map["data"])


# ------------------------------------------------------------------------------------ variants

#: Variants of the examples that reach the branches the examples alone do not. Each is built
#: from an example by changing a few fields, so it stays a realistic run.
VARIANTS: dict[str, dict[str, Any]] = {
    "lora-unmerged": changed(example("llama-lora-merge"), {"spec.output.merge": False}),
    "qlora-fp16": changed(example("mistral-qlora"), {"spec.training.precision": "fp16"}),
    "dpo-settings": changed(
        example("tulu-dpo"),
        {"spec.method.dpo": {"beta": 0.25, "lossType": "ipo", "maxPromptLength": 512}},
    ),
    "dpo-lora-on-uri": changed(
        example("tulu-dpo"),
        {
            "spec.model": {"uri": "s3://models/meta-llama/Llama-3.1-8B-Instruct"},
            "spec.method.adapter": {"type": "lora", "r": 8},
            "spec.output.merge": True,
            "spec.distributed": {"zeroStage": 2, "offload": "cpu"},
        },
    ),
    "zero3-offload-2x4": changed(
        example("tulu-sft"),
        {
            "spec.resources": {"nodes": 2, "gpusPerNode": 4, "memory": "256Gi"},
            "spec.distributed": {"zeroStage": 3, "offload": "cpu"},
            "spec.sanity": {"steps": 10, "gpus": 2},
            "spec.training.maxGradNorm": 0.5,
        },
    ),
    "ladder-2x4": changed(
        example("tulu-sft"),
        {
            "spec.resources": {"nodes": 2, "gpusPerNode": 4},
            "spec.distributed": {"zeroStage": 3, "offload": "cpu"},
            "spec.sanity": {
                "rungs": [
                    {"gpus": 1, "steps": 20, "zeroStage": 0, "optimizer": "paged_adamw_8bit"},
                    {"gpus": 2, "steps": 20, "microBatchSize": 2},
                    {"gpus": 8, "steps": 10, "minLossDrop": 0.0, "maxGradNorm": 100},
                ]
            },
        },
    ),
    "hub-model": changed(
        example("llama-lora-merge"),
        {
            "spec.model.uri": "hf://meta-llama/Llama-3.1-8B-Instruct@main",
            "spec.storage.hf": {"secretName": "hf-token", "endpoint": "https://hub.example"},
            "spec.output.push": {"hub": "kubetrain-test/llama-tuned", "revision": "main"},
        },
    ),
    "data-plane-settings": changed(
        example("tinystories"),
        {
            "spec.output.maxPerplexity": 30,
            "spec.storage.s3": {
                "secretName": "minio",
                "endpoint": "http://minio.storage:9000",
                "allowInsecureEndpoint": True,
            },
            "spec.data.train": ["s3://datasets/tinystories/", "s3://datasets/more/*.txt"],
        },
    ),
    "zero1-3-nodes": changed(
        example("tulu-sft"),
        {
            "spec.resources": {"nodes": 3, "gpusPerNode": 2, "gpuResource": "amd.com/gpu"},
            "spec.distributed": {"zeroStage": 1},
            "spec.sanity": {"rungs": [{"gpus": 1}, {"gpus": 6, "steps": 10}]},
            "spec.training": {"maxSteps": 1000, "learningRate": 1.0e-5},
        },
    ),
    "sanity-defaults": changed(example("llama-lora-merge"), {"spec.sanity": {}}),
    "no-sanity-cpu-2-nodes": changed(
        example("tinystories"),
        {"spec.sanity": DELETE, "spec.resources": {"nodes": 2, "gpusPerNode": 0}},
    ),
    "pretrain-tokenizer-uri": changed(
        example("tinystories"),
        {
            "spec.tokenizer": {"uri": "s3://tokenizers/tinystories-bpe-10k"},
            "spec.model.architecture.kvHeads": 4,
            "spec.model.architecture.vocabSize": 10240,
        },
    ),
    "pvc-everywhere": changed(
        example("llama-lora-merge"),
        {
            "spec.model.uri": "pvc://models/meta-llama/Llama-3.1-8B-Instruct",
            "spec.data.train": ["pvc://datasets/support/a.jsonl", "pvc://datasets/support/b.jsonl"],
            "spec.data.validation": ["pvc://datasets/support/val.jsonl"],
            "spec.data.validationFraction": DELETE,
            "spec.output.uri": "pvc://runs/llama31-support",
            "spec.storage": {"cacheRoot": "pvc://cache/kubetrain"},
            "spec.resources.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "spec.resources.tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    ),
    "sources-mixture": changed(
        example("tulu-sft"),
        {
            "spec.data.train": DELETE,
            "spec.data.validationFraction": DELETE,
            "spec.data.sources": [
                {
                    "name": "policies",
                    "uri": "s3://datasets/policy/",
                    "exclude": ["*/processed/*", "*/failed/*"],
                    "fraction": 0.5,
                    "maxRejectedFraction": 0.05,
                },
                {
                    "name": "tulu",
                    "uri": "hf://datasets/allenai/tulu-3-sft-mixture@main",
                    "config": "default",
                    "split": "train",
                    "files": ["data/*.parquet"],
                    "fraction": 0.1,
                },
                {
                    "name": "operatives",
                    "uri": "pvc://datasets/ops/",
                    "maxRows": 50000,
                    "optional": True,
                },
            ],
            "spec.data.validationSources": [{"name": "held-out", "uri": "s3://datasets/held/"}],
            "spec.storage.hf": {"secretName": "hf-token"},
        },
    ),
}


#: Examples meant for `kubetrain run` only (local paths): a cluster refuses them (plan's rule).
LOCAL_ONLY = {"tinystories-cpu", "mixture-cpu"}


def all_documents() -> dict[str, dict[str, Any]]:
    """The examples and the variants that a cluster accepts, by a readable id."""
    return {**{n: example(n) for n in EXAMPLE_NAMES if n not in LOCAL_ONLY}, **VARIANTS}


def local_documents() -> dict[str, dict[str, Any]]:
    """The runs `kubetrain run` accepts (the local-only example and cluster-free variants)."""
    return {n: example(n) for n in sorted(LOCAL_ONLY)}
