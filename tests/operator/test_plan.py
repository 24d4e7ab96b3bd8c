"""`plan`: a TrainingRun → its ordered, complete stages (configs, shape, resources, env).

Real: the TrainingRun model, `plan_run`, the shipped examples, the transformers DeepSpeed
integration (`HfTrainerDeepSpeedConfig`, which fills the config's "auto" values from the training
arguments and the model's hidden size, as the trainer's Trainer does) and DeepSpeed's own config
parser (`deepspeed.runtime.config.DeepSpeedConfig`, which checks the batch-size arithmetic and
rejects unknown ZeRO keys). Emulated: the torch.distributed process group DeepSpeed asks for its
world size (a stub that answers with the world size the plan intends), and the training arguments
and model the integration reads (plain objects with the stage config's values and a hidden size)
— no processes are started. Expected values come from the documents and docs/api.md,
docs/architecture.md, never from plan's output.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from kubetrain_contract.configs import STAGE_API_VERSION
from kubetrain_operator.api import InvalidRun, SpecError, parse_run
from kubetrain_operator.plan import plan_run, upstream_model_uri
from runspecs import (
    DELETE,
    VARIANTS,
    all_documents,
    changed,
    example,
    planned,
    string_leaves,
)

DOCUMENTS = all_documents()
EXAMPLE_NAMES = [n for n in sorted(DOCUMENTS) if n not in VARIANTS]


def spec_get(doc: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def stage_config(doc: dict[str, Any], name: str, **kwargs: Any) -> dict[str, Any]:
    _, plan = planned(doc, **kwargs)
    stage = plan.stage(name)
    assert stage is not None, f"no {name} stage"
    return stage.config


# ---------------------------------------------------------------------------------------- stages


def rungs_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The sanity ladder as api.md writes it: `rungs`, or the single gate as one rung."""
    gate = spec_get(doc, "spec.sanity")
    if gate is None:
        return []
    return list(gate["rungs"]) if "rungs" in gate else [gate]


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_stages_in_order_with_their_configs(name: str) -> None:
    doc = DOCUMENTS[name]
    run, plan = planned(doc)
    rungs = [f"sanity-{i}" for i in range(1, len(rungs_of(doc)) + 1)]
    expected = ["preprocess", *rungs, "train", "merge"]
    assert [s.name for s in plan.stages] == expected
    for stage in plan.stages:
        assert stage.config["apiVersion"] == STAGE_API_VERSION
        assert stage.config["stage"] == ("sanity" if stage.name in rungs else stage.name)
        assert stage.config["run"] == doc["metadata"]["name"] == plan.run == run.name
        assert stage.config["metricsPort"] == stage.metrics_port == 9400  # metrics.md
        assert stage.world_size == stage.nodes * stage.procs_per_node
    # Only the training stages are distributed (PyTorchJobs); the others are one process.
    assert [s.name for s in plan.stages if s.kind == "PyTorchJob"] == expected[1:-1]
    assert [s.name for s in plan.stages if s.kind == "Job"] == ["preprocess", "merge"]


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_train_stage_shape_and_world_size(name: str) -> None:
    doc = DOCUMENTS[name]
    _, plan = planned(doc)
    nodes = spec_get(doc, "spec.resources.nodes", 1)
    gpus = spec_get(doc, "spec.resources.gpusPerNode", 1)
    train = plan.stage("train")
    assert train is not None
    assert (train.nodes, train.gpus_per_node) == (nodes, gpus)
    assert train.procs_per_node == max(gpus, 1)  # gpusPerNode 0 = one CPU process (gloo)
    assert train.world_size == train.config["distributed"]["worldSize"] == nodes * max(gpus, 1)
    assert train.config["distributed"]["zeroStage"] == spec_get(
        doc, "spec.distributed.zeroStage", 0
    )


@pytest.mark.parametrize("name", [n for n in sorted(DOCUMENTS) if rungs_of(DOCUMENTS[n])])
def test_each_rung_is_a_short_gated_run_with_its_overrides(name: str) -> None:
    doc = DOCUMENTS[name]
    _, plan = planned(doc)
    train = plan.stage("train")
    assert train is not None
    per_node = spec_get(doc, "spec.resources.gpusPerNode", 1)
    for index, rung in enumerate(rungs_of(doc), start=1):
        sanity = plan.stage(f"sanity-{index}")
        assert sanity is not None and sanity.rung == index
        # api.md: a rung's gpus default to 1, or 0 for CPU runs; beyond a node, whole nodes.
        gpus = rung.get("gpus", 1 if per_node > 0 else 0)
        assert sanity.nodes * sanity.gpus_per_node == gpus
        assert sanity.world_size == max(gpus, 1)
        assert sanity.gpus_per_node <= per_node
        config = sanity.config
        assert config["training"]["maxSteps"] == rung.get("steps", 100)
        assert config["training"]["epochs"] is None
        assert config["sanity"] == {
            "minLossDrop": rung.get("minLossDrop", 0.10),
            "maxGradNorm": rung.get("maxGradNorm", 1000),
        }
        assert config["distributed"]["worldSize"] == max(gpus, 1)
        zero = rung.get("zeroStage", spec_get(doc, "spec.distributed.zeroStage", 0))
        assert config["distributed"]["zeroStage"] == zero
        assert (config["distributed"]["deepspeed"] is None) == (zero == 0)
        assert config["training"]["optimizer"] == rung.get(
            "optimizer", spec_get(doc, "spec.training.optimizer", "adamw_torch")
        )
        assert config["training"]["microBatchSize"] == rung.get(
            "microBatchSize", spec_get(doc, "spec.training.microBatchSize", 1)
        )
        # A rung must not leave checkpoints where the real run (or another rung) resumes from.
        assert config["outputUri"] != train.config["outputUri"]
        others = [s.config["outputUri"] for s in plan.sanity_stages if s is not sanity]
        assert config["outputUri"] not in others
        # Everything else trains the same model the same way.
        for key in ("method", "model", "adapter", "dpo", "datasetPointer"):
            assert config[key] == train.config[key], key
        for key in ("learningRate", "precision", "seed"):
            assert config["training"][key] == train.config["training"][key], key
    assert train.config["sanity"] is None


def test_the_ladder_of_seed_003() -> None:
    """1 GPU without DeepSpeed and an 8-bit optimizer, then 2 GPUs with ZeRO-3, then 8 (2 × 4)."""
    _, plan = planned(VARIANTS["ladder-2x4"])
    shapes = [
        (
            s.nodes,
            s.procs_per_node,
            s.config["distributed"]["zeroStage"],
            s.config["training"]["optimizer"],
        )
        for s in plan.sanity_stages
    ]
    assert shapes == [
        (1, 1, 0, "paged_adamw_8bit"),
        (1, 2, 3, "adamw_torch"),
        (2, 4, 3, "adamw_torch"),
    ]
    # offload applies from ZeRO-2: the run's offload reaches the ZeRO-3 rungs only
    ds = [s.config["distributed"]["deepspeed"] for s in plan.sanity_stages]
    assert ds[0] is None
    assert ds[1]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("sanity_gpus", range(1, 9))
def test_no_stage_asks_one_node_for_more_gpus_than_a_node_has(sanity_gpus: int) -> None:
    """2 nodes × 4 GPUs: a sanity rung is either refused or fits the nodes (never 8 on one)."""
    doc = changed(
        example("tulu-sft"),
        {"spec.resources": {"nodes": 2, "gpusPerNode": 4}, "spec.sanity": {"gpus": sanity_gpus}},
    )
    try:
        _, plan = planned(doc)
    except InvalidRun as refused:
        assert sanity_gpus in (5, 6, 7)  # not whole nodes
        assert [p.path for p in refused.problems] == ["spec.sanity.gpus"]
        return
    for stage in plan.stages:
        assert stage.gpus_per_node <= 4, stage.name
    sanity = plan.stage("sanity-1")
    assert sanity is not None and sanity.nodes * sanity.gpus_per_node == sanity_gpus


# -------------------------------------------------------------------------------- per-stage compute


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_resources_per_stage(name: str) -> None:
    doc = DOCUMENTS[name]
    _, plan = planned(doc)
    res = spec_get(doc, "spec.resources", {})
    gpu = res.get("gpuResource", "nvidia.com/gpu")
    per_node = res.get("gpusPerNode", 1)
    for stage in plan.stages:
        requests, limits = stage.resources.get("requests", {}), stage.resources.get("limits", {})
        assert requests == limits, stage.name  # Guaranteed QoS where set
        assert requests.get(gpu, "0") == str(stage.gpus_per_node), stage.name
    preprocess = plan.stage("preprocess")
    assert preprocess is not None
    # api.md: preprocessing never gets GPUs, nor the training pods' CPUs and memory
    pre = res.get("preprocess", {})
    assert preprocess.resources["requests"] == {
        "cpu": str(pre.get("cpu", "4")),
        "memory": str(pre.get("memory", "16Gi")),
    }
    train = plan.stage("train")
    assert train is not None
    for key in ("cpu", "memory"):
        assert train.resources.get("requests", {}).get(key) == (
            str(res[key]) if key in res else None
        )
    merge = plan.stage("merge")
    assert merge is not None
    merge_gpus = res.get("merge", {}).get("gpus", 1 if per_node else 0)
    assert merge.gpus_per_node == merge_gpus
    assert ("1 GPU" in merge.summary) == bool(merge_gpus)


def test_merge_on_cpu_says_so() -> None:
    doc = changed(example("llama-lora-merge"), {"spec.resources.merge.gpus": 0})
    _, plan = planned(doc)
    merge = plan.stage("merge")
    assert merge is not None and merge.gpus_per_node == 0
    assert "CPU" in merge.summary and "resources.merge.gpus" in merge.summary
    assert "nvidia.com/gpu" not in merge.resources["requests"]


# ------------------------------------------------------------------------------------ environment


def env_of(stage: Any) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in stage.env}


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_env_has_credentials_only_by_reference(name: str) -> None:
    doc = DOCUMENTS[name]
    _, plan = planned(doc)
    s3 = spec_get(doc, "spec.storage.s3", {})
    hf = spec_get(doc, "spec.storage.hf", {})
    data = doc["spec"]["data"]
    data_uris = [s["uri"] for key in ("sources", "validationSources") for s in data.get(key, [])]
    uses_hub = any(
        str(uri).startswith("hf://")
        for uri in (spec_get(doc, "spec.model.uri", ""), spec_get(doc, "spec.tokenizer.uri", ""))
    ) or any(uri.startswith("hf://datasets/") for uri in data_uris)
    for stage in plan.stages:
        env = env_of(stage)
        for entry in stage.env:
            if entry["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
                assert set(entry) == {"name", "valueFrom"}
                assert set(entry["valueFrom"]) == {"secretKeyRef"}
        if "secretName" in s3:
            assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == s3["secretName"]
        assert ("HF_HUB_OFFLINE" in env) is not uses_hub
        assert ("HF_TOKEN" in env) == (uses_hub and "secretName" in hf)
        assert env.get("HF_ENDPOINT") == (hf.get("endpoint") if uses_hub else None)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_train_config_carries_the_spec(name: str) -> None:
    doc = example(name)
    spec = doc["spec"]
    config = stage_config(doc, "train")
    training = spec.get("training", {})
    for key, value in training.items():
        assert config["training"][key] == value, key
    if "maxSteps" in training:
        assert config["training"]["epochs"] is None
    adapter = spec["method"].get("adapter", {"type": "none"})
    for key, value in adapter.items():
        assert config["adapter"][key] == value, key
    assert config["method"] == spec["method"]["stage"]
    assert (config["dpo"] is not None) == (spec["method"]["stage"] == "dpo")
    if "dpo" in spec["method"]:
        assert config["dpo"]["beta"] == spec["method"]["dpo"]["beta"]
    checkpoints = spec.get("checkpoints", {})
    for key, value in checkpoints.items():
        assert config["checkpoints"][key] == value, key
    assert config["outputUri"] == spec["output"]["uri"].rstrip("/")
    if "uri" in spec["model"]:
        assert config["model"]["uri"] == spec["model"]["uri"]


@pytest.mark.parametrize("name", ["tinystories", "tinystories-cpu", "pretrain-tokenizer-uri"])
def test_architecture_defaults_are_made_explicit(name: str) -> None:
    doc = DOCUMENTS.get(name) or example(name)
    arch = doc["spec"]["model"]["architecture"]
    target = "cluster" if name in DOCUMENTS else "local"
    model = stage_config(doc, "train", target=target)["model"]["architecture"]
    for key in ("hiddenSize", "layers", "heads", "contextLength"):
        assert model[key] == arch[key]
    # api.md / api.py docs: kvHeads defaults to heads; the MLP width is 8/3 × hiddenSize rounded
    # up to a multiple of 64 (the Llama ratio).
    assert model["kvHeads"] == arch.get("kvHeads", arch["heads"])
    assert model["intermediateSize"] == 64 * math.ceil(arch["hiddenSize"] * 8 / 3 / 64)
    assert model["vocabSize"] == arch.get("vocabSize")


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_preprocess_config_carries_the_data_spec(name: str) -> None:
    doc = DOCUMENTS[name]
    data, spec = doc["spec"]["data"], doc["spec"]
    config = stage_config(doc, "preprocess")
    written = {(s["split"], s["name"]): s for s in config["sources"]}
    named = [("train", f"train-{i}", {"uri": u}) for i, u in enumerate(data.get("train", []))]
    named += [("train", s["name"], s) for s in data.get("sources", [])]
    named += [
        ("validation", f"validation-{i}", {"uri": u})
        for i, u in enumerate(data.get("validation", []))
    ]
    named += [("validation", s["name"], s) for s in data.get("validationSources", [])]
    assert set(written) == {(split, name) for split, name, _ in named}
    for split, name, source in named:
        planned_source = written[split, name]
        if not source["uri"].startswith("pvc://"):
            assert planned_source["uri"] == source["uri"]
        assert planned_source["exclude"] == source.get("exclude", [])
        assert planned_source["fraction"] == source.get("fraction")
        assert planned_source["maxRows"] == source.get("maxRows")
        assert planned_source["optional"] is source.get("optional", False)
        assert planned_source["maxRejectedFraction"] == source.get("maxRejectedFraction")
        hub = {k: source.get(k) for k in ("config", "split")} | {"files": source.get("files", [])}
        hub_dataset = source["uri"].startswith("hf://datasets/")
        assert planned_source["hub"] == (hub if hub_dataset else None)
    assert config["format"] == data["format"]
    assert config["blockSize"] == data.get("blockSize", 1024)
    assert config["chatTemplate"] == data.get("chatTemplate")
    tokenizer = spec.get("tokenizer", {})
    if "train" in tokenizer:
        assert config["tokenizer"]["train"]["vocabSize"] == tokenizer["train"]["vocabSize"]
        assert config["tokenizer"]["train"]["specialTokens"] == tokenizer["train"].get(
            "specialTokens", ["<|endoftext|>"]
        )
    elif "uri" in tokenizer:
        assert config["tokenizer"] == {"uri": tokenizer["uri"], "train": None}
    else:  # api.md: default is the model's own tokenizer
        model_uri = stage_config(doc, "train")["model"]["uri"]
        assert config["tokenizer"] == {"uri": model_uri, "train": None}
    assert config["documentSeparator"] == data.get("documentSeparator")
    assert config["crossDocumentAttention"] is data.get("packing", {}).get(
        "crossDocumentAttention", True
    )
    s3 = spec.get("storage", {}).get("s3", {})
    assert config["s3"]["allowInsecureEndpoint"] is s3.get("allowInsecureEndpoint", False)


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_merge_stage_follows_output_merge(name: str) -> None:
    doc = DOCUMENTS[name]
    _, plan = planned(doc)
    merge, train = plan.stage("merge"), plan.stage("train")
    assert merge is not None and train is not None
    assert merge.config["merge"] is doc["spec"]["output"].get("merge", False)
    assert merge.config["model"] == train.config["model"]
    assert merge.config["adapter"] == train.config["adapter"]
    assert merge.config["outputUri"] == train.config["outputUri"]
    assert merge.config["maxPerplexity"] == doc["spec"]["output"].get("maxPerplexity")
    assert merge.nodes == 1 and merge.gpus_per_node <= 1


# ------------------------------------------------------------------------------------- DeepSpeed

DEEPSPEED_CASES = [(0, "none"), (1, "none"), (2, "none"), (2, "cpu"), (3, "none"), (3, "cpu")]
NODES, GPUS, SANITY_GPUS, MICRO, ACCUM, CLIP, HIDDEN = 2, 4, 2, 2, 3, 0.7, 4096


def deepspeed_doc(stage: int, offload: str, precision: str) -> dict[str, Any]:
    return changed(
        example("tulu-sft"),
        {
            "spec.resources": {"nodes": NODES, "gpusPerNode": GPUS},
            "spec.distributed": {"zeroStage": stage, "offload": offload},
            "spec.sanity": {"steps": 10, "gpus": SANITY_GPUS},
            "spec.training.microBatchSize": MICRO,
            "spec.training.gradientAccumulationSteps": ACCUM,
            "spec.training.maxGradNorm": CLIP,
            "spec.training.precision": precision,
            "spec.training.weightPrecision": "fp32",
        },
    )


class _ProcessGroup:
    """Stands in for torch.distributed: DeepSpeed only asks for the rank and the world size."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_rank(self) -> int:
        return 0

    def get_world_size(self, *_: Any) -> int:
        return self.world_size


def filled_by_transformers(config: dict[str, Any], world: int) -> dict[str, Any]:
    """The DeepSpeed config as the trainer's HF Trainer completes it: its "auto" values filled
    from the training arguments (the stage config's values, as train.py passes them) and from the
    model's hidden size."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    t = config["training"]
    args = SimpleNamespace(
        world_size=world,
        per_device_train_batch_size=t["microBatchSize"],
        gradient_accumulation_steps=t["gradientAccumulationSteps"],
        max_grad_norm=t["maxGradNorm"],
        learning_rate=t["learningRate"],
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=t["weightDecay"],
        save_on_each_node=False,
        fp16=t["precision"] == "fp16",
        fp16_full_eval=False,
        bf16=t["precision"] == "bf16",
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: math.ceil(steps * t["warmupRatio"]),
    )
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config["distributed"]["deepspeed"]))
    hf.trainer_config_process(args)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=HIDDEN))
    hf.trainer_config_finalize(args, model, num_training_steps=100)
    return dict(hf.config)


def parse_with_deepspeed(config: dict[str, Any], world_size: int) -> Any:
    """DeepSpeed's own parser: it asserts train_batch_size = micro × accumulation × world."""
    import deepspeed.runtime.config as ds_config

    with mock.patch.object(ds_config, "dist", _ProcessGroup(world_size)):
        return ds_config.DeepSpeedConfig(dict(config))


def autos(node: Any, path: str = "") -> list[str]:
    """Paths still set to "auto"."""
    if node == "auto":
        return [path]
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in autos(value, f"{path}.{key}")]
    return []


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(("zero", "offload"), DEEPSPEED_CASES)
def test_deepspeed_config_per_zero_stage(zero: int, offload: str, precision: str) -> None:
    doc = deepspeed_doc(zero, offload, precision)
    configs = {}
    for name, world in (("train", NODES * GPUS), ("sanity-1", SANITY_GPUS)):
        config = stage_config(doc, name)
        distributed = config["distributed"]
        assert distributed["zeroStage"] == zero
        assert distributed["worldSize"] == world
        ds = distributed["deepspeed"]
        configs[name] = ds
        if zero == 0:
            assert ds is None, "zeroStage 0 is plain DDP: no DeepSpeed config"
            continue
        # "auto" wherever the transformers integration fills the value: one source (the stage
        # config's training section), and no dependence on the world size
        for key in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "gradient_clipping",
        ):
            assert ds[key] == "auto", key
        assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
        zero_cfg = ds["zero_optimization"]
        assert zero_cfg["stage"] == zero
        assert zero_cfg["reduce_bucket_size"] == "auto"
        if zero == 3:  # docs/testing.md: without it ZeRO-3 saves no weights
            assert zero_cfg["stage3_gather_16bit_weights_on_model_save"] is True
        optimizer_device = zero_cfg.get("offload_optimizer", {}).get("device", "none")
        param_device = zero_cfg.get("offload_param", {}).get("device", "none")
        assert optimizer_device == offload
        assert param_device == (offload if zero == 3 else "none")

        filled = filled_by_transformers(config, world)
        assert autos(filled) == []
        parsed = parse_with_deepspeed(filled, world)
        assert parsed.zero_optimization_stage == zero
        assert parsed.train_micro_batch_size_per_gpu == MICRO
        assert parsed.gradient_accumulation_steps == ACCUM
        assert parsed.train_batch_size == MICRO * ACCUM * world
        assert parsed.gradient_clipping == CLIP
        assert parsed.bfloat16_config.enabled is (precision == "bf16")
        assert parsed.float16_config.enabled is (precision == "fp16")
        assert parsed.zero_config.reduce_bucket_size == HIDDEN * HIDDEN
        if zero == 3:
            assert parsed.zero_config.gather_16bit_weights_on_model_save is True
        if offload == "cpu":
            assert parsed.zero_config.offload_optimizer is not None
            assert str(parsed.zero_config.offload_optimizer.device).endswith("cpu")
    # the same DeepSpeed config for 2 and for 8 processes
    assert configs["train"] == configs["sanity-1"]


def test_deepspeed_parser_check_can_fail() -> None:
    """The real parser is not a rubber stamp: a wrong world size or an unknown key is refused."""
    config = stage_config(deepspeed_doc(3, "none", "bf16"), "train")
    ds = filled_by_transformers(config, NODES * GPUS)
    with pytest.raises(AssertionError, match="train_batch_size"):
        parse_with_deepspeed(ds, NODES * GPUS + 1)
    bad = {**ds, "zero_optimization": {**ds["zero_optimization"], "stage3_gather": True}}
    with pytest.raises(Exception, match="stage3_gather"):
        parse_with_deepspeed(bad, NODES * GPUS)


# ------------------------------------------------------------------------------ preprocess key

DATA_CHANGES: dict[str, dict[str, Any]] = {
    "train files": {"spec.data.train": ["s3://datasets/tulu-3-sft-mixture/other.jsonl"]},
    "validation files": {
        "spec.data.validationFraction": DELETE,
        "spec.data.validation": ["s3://datasets/tulu-3-sft-mixture/val.jsonl"],
    },
    "block size": {"spec.data.blockSize": 2048},
    "format": {"spec.data.format": "text", "spec.data.chatTemplate": DELETE},
    "messages field": {"spec.data.messagesField": "conversation"},
    "chat template": {"spec.data.chatTemplate": "chatml"},
    "packing": {"spec.data.partialBlock": "drop"},
    "tokenizer": {"spec.tokenizer": {"uri": "s3://tokenizers/llama3"}},
    "model (its tokenizer)": {"spec.model.uri": "s3://models/meta-llama/Llama-3.2-1B"},
}


def preprocess_key(doc: dict[str, Any]) -> str:
    return planned(doc)[1].preprocess_key


@pytest.mark.parametrize("what", sorted(DATA_CHANGES))
def test_preprocess_key_changes_with_data_settings(what: str) -> None:
    base = example("tulu-sft")
    assert preprocess_key(changed(base, DATA_CHANGES[what])) != preprocess_key(base)


def test_preprocess_key_is_stable_and_ignores_the_run() -> None:
    base = example("tulu-sft")
    key = preprocess_key(base)
    assert key == preprocess_key(base)
    assert len(key) == 64 and int(key, 16) >= 0  # a sha256
    renamed = changed(base, {"metadata.name": "another-run"})
    assert preprocess_key(renamed) == key
    # Another run with its own output and training settings, sharing the cache: same dataset.
    other = changed(
        base,
        {
            "metadata.name": "llama31-tulu-sft-lr2",
            "spec.output.uri": "s3://llm-runs/llama31-tulu-sft-lr2/",
            "spec.training.learningRate": 2.0e-5,
            "spec.resources.nodes": 2,
            "spec.maxRestarts": 1,
        },
    )
    assert preprocess_key(other) == key


# ------------------------------------------------------------------------------------ pvc:// URIs

PVC_FIELDS = {
    "spec.model.uri": ("spec.model.uri", "pvc://models/llama"),
    "spec.tokenizer.uri": ("spec.tokenizer", {"uri": "pvc://models/llama-tokenizer"}),
    "spec.data.train": ("spec.data.train", ["s3://d/a.jsonl", "pvc://datasets/b.jsonl"]),
    "spec.data.validation": ("spec.data.validation", ["pvc://datasets/val.jsonl"]),
    "spec.output.uri": ("spec.output.uri", "pvc://runs/llama31-support/"),
    "spec.storage.cacheRoot": ("spec.storage.cacheRoot", "pvc://cache"),
}


def test_pvc_uris_map_to_the_mount_root() -> None:
    doc = VARIANTS["pvc-everywhere"]
    _, plan = planned(doc)
    assert set(plan.pvc_claims) == {"models", "datasets", "runs", "cache"}
    preprocess, train = plan.stage("preprocess"), plan.stage("train")
    assert preprocess is not None and train is not None
    assert [(s["name"], s["uri"]) for s in preprocess.config["sources"]] == [
        ("train-0", "/mnt/pvc/datasets/support/a.jsonl"),
        ("train-1", "/mnt/pvc/datasets/support/b.jsonl"),
        ("validation-0", "/mnt/pvc/datasets/support/val.jsonl"),
    ]
    assert preprocess.config["cacheRoot"] == "/mnt/pvc/cache/kubetrain"
    assert train.config["model"]["uri"] == "/mnt/pvc/models/meta-llama/Llama-3.1-8B-Instruct"
    assert train.config["outputUri"] == "/mnt/pvc/runs/llama31-support"
    for stage in plan.stages:
        leaves = [v for _, v in string_leaves(stage.config)]
        assert not [v for v in leaves if "pvc://" in v], stage.name


@pytest.mark.parametrize("field", sorted(PVC_FIELDS))
def test_pvc_is_refused_for_local_runs_naming_the_field(field: str) -> None:
    path, value = PVC_FIELDS[field]
    doc = changed(example("llama-lora-merge"), {path: value})
    if field == "spec.data.validation":
        doc = changed(doc, {"spec.data.validationFraction": DELETE})
    _, cluster_plan = planned(doc)  # fine in a cluster
    assert cluster_plan.pvc_claims
    with pytest.raises(SpecError) as caught:
        planned(doc, target="local")
    assert caught.value.path.startswith(field), caught.value.path
    assert "pvc://" in caught.value.problem


HF_FIELDS = {
    "spec.model.uri": "hf://meta-llama/Llama-3.1-8B",
    "spec.tokenizer": {"uri": "hf://meta-llama/Llama-3.1-8B@main"},
}


@pytest.mark.parametrize("field", sorted(HF_FIELDS))
@pytest.mark.parametrize("target", ["cluster", "local"])
def test_hf_models_and_tokenizers_reach_the_stages(field: str, target: str) -> None:
    doc = changed(example("llama-lora-merge"), {field: HF_FIELDS[field]})
    doc = changed(doc, {"spec.storage.hf": {"secretName": "hf-token"}})
    if target == "local":
        doc = changed(doc, {"spec.data.train": ["data/train.jsonl"], "spec.output.uri": "out"})
    _, plan = planned(doc, target=target)
    uri = HF_FIELDS[field] if field == "spec.model.uri" else HF_FIELDS[field]["uri"]
    leaves = [v for stage in plan.stages for _, v in string_leaves(stage.config)]
    assert uri in leaves
    for stage in plan.stages:
        names = [e["name"] for e in stage.env]
        assert "HF_HUB_OFFLINE" not in names
        assert ("HF_TOKEN" in names) is (target == "cluster")  # locally: the caller's own env


LOCAL_PATHS = {
    "spec.data.train": ("spec.data.train", ["s3://d/a.jsonl", "data/b.jsonl"], "[1]"),
    "spec.data.validation": ("spec.data.validation", ["/abs/val.jsonl"], "[0]"),
    "spec.model.uri": ("spec.model.uri", "models/base", ""),
    "spec.tokenizer.uri": ("spec.tokenizer", {"uri": "file:///models/tok"}, ".uri"),
    "spec.output.uri": ("spec.output.uri", "runs/out", ""),
    "spec.storage.cacheRoot": ("spec.storage.cacheRoot", "./cache", ""),
}


@pytest.mark.parametrize("field", sorted(LOCAL_PATHS))
def test_local_paths_are_refused_for_a_cluster_naming_the_field(field: str) -> None:
    where, value, suffix = LOCAL_PATHS[field]
    doc = changed(example("llama-lora-merge"), {where: value})
    if field == "spec.data.validation":
        doc = changed(doc, {"spec.data.validationFraction": DELETE})
    with pytest.raises(SpecError) as caught:
        planned(doc)
    assert caught.value.path == where + suffix
    assert "pvc://" in caught.value.fix and "s3://" in caught.value.fix


def test_a_relative_local_prefix_stays_a_prefix_under_kubetrain_run() -> None:
    """`dir/` names every file under it; resolved against the working directory it keeps its
    slash (without it the stage refuses a directory named as a file)."""
    doc = changed(example("tinystories-cpu"), {"spec.data.train": ["data/notes/", "data/./a.txt"]})
    plan = plan_run(parse_run(doc), target="local", base_dir="/home/me/project")
    (preprocess,) = [s for s in plan.stages if s.role == "preprocess"]
    uris = [s["uri"] for s in preprocess.config["sources"]]
    assert uris == ["/home/me/project/data/notes/", "/home/me/project/data/a.txt"]


def test_every_local_path_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as caught:
        planned(example("tinystories-cpu"))
    assert {e.path for e in getattr(caught.value, "errors", [caught.value])} == {
        "spec.output.uri",
        "spec.data.train[0]",
    }


def test_local_runs_keep_local_and_s3_uris() -> None:
    doc = example("tinystories-cpu")
    _, plan = planned(doc, target="local")
    assert plan.pvc_claims == ()
    preprocess = plan.stage("preprocess")
    assert preprocess is not None
    assert [s["uri"] for s in preprocess.config["sources"]] == doc["spec"]["data"]["train"]


# --------------------------------------------------------------------------------------- fromRun


def upstream(adapter: str, merge: bool, output: str = "s3://llm-runs/up/") -> dict[str, Any]:
    return changed(
        example("tulu-sft"),
        {
            "metadata.name": "up",
            "spec.method.adapter": {"type": adapter},
            "spec.output": {"uri": output, "merge": merge},
            "spec.distributed": {"zeroStage": 0},
            "spec.training.precision": "bf16",
            "spec.sanity": {"steps": 10, "gpus": 1},
        },
    )


@pytest.mark.parametrize(
    ("adapter", "merge", "folder"),
    [("lora", True, "merged"), ("qlora", True, "merged"), ("none", False, "final")],
)
def test_upstream_model_is_the_full_model(adapter: str, merge: bool, folder: str) -> None:
    # docs/architecture.md: final/ holds the model (or only an adapter), merged/ the merged model.
    up = upstream(adapter, merge)
    assert upstream_model_uri(parse_run(up)) == f"s3://llm-runs/up/{folder}"


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_adapter_only_upstream_is_refused(adapter: str) -> None:
    with pytest.raises(SpecError) as caught:
        upstream_model_uri(parse_run(upstream(adapter, merge=False)))
    assert caught.value.path == "spec.model.fromRun"
    assert "merge" in caught.value.fix


def test_from_run_needs_the_upstream_model() -> None:
    run = parse_run(example("tulu-dpo"))
    with pytest.raises(SpecError) as caught:
        plan_run(run)
    assert caught.value.path == "spec.model.fromRun"


def test_from_run_chain_uses_the_upstream_output_everywhere() -> None:
    dpo, sft = example("tulu-dpo"), example("tulu-sft")
    assert dpo["spec"]["model"]["fromRun"] == sft["metadata"]["name"]
    # tulu-sft is a full fine-tune (no adapter): its model is <output>/final.
    expected = sft["spec"]["output"]["uri"].rstrip("/") + "/final"
    _, plan = planned(dpo)
    for stage in plan.stages:
        if stage.name == "preprocess":  # the tokenizer comes with the model
            assert stage.config["tokenizer"] == {"uri": expected, "train": None}
        else:
            assert stage.config["model"] == {
                "uri": expected,
                "architecture": None,
                "quantized": False,
            }


def test_from_run_on_a_pvc_is_mounted() -> None:
    up = upstream("lora", merge=True, output="pvc://runs/up")
    _, plan = planned(example("tulu-dpo"), upstream=up)
    assert "runs" in plan.pvc_claims
    train = plan.stage("train")
    assert train is not None and train.config["model"]["uri"] == "/mnt/pvc/runs/up/merged"


def test_preprocess_key_ignores_the_order_of_sources_but_not_their_terms() -> None:
    doc = VARIANTS["sources-mixture"]
    listed = doc["spec"]["data"]["sources"]
    key = preprocess_key(doc)
    assert preprocess_key(changed(doc, {"spec.data.sources": listed[::-1]})) == key
    refracted = [{**listed[0], "fraction": 0.6}, *listed[1:]]
    assert preprocess_key(changed(doc, {"spec.data.sources": refracted})) != key
    uncapped = [*listed[:2], {k: v for k, v in listed[2].items() if k != "maxRows"}]
    assert preprocess_key(changed(doc, {"spec.data.sources": uncapped})) != key
