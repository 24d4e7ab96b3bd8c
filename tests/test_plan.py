"""`plan`: a TrainingRun → its ordered stages and their stage configs, and the DeepSpeed config.

Real: the TrainingRun model, `plan_run`, the shipped examples, and DeepSpeed's own config parser
(`deepspeed.runtime.config.DeepSpeedConfig`, which checks the batch-size arithmetic and rejects
unknown ZeRO keys). Emulated: only the torch.distributed process group DeepSpeed asks for its world
size (a stub that answers with the world size the plan intends) — no processes are started.
Expected values come from the documents and api.md / architecture.md, never from plan's output.
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import pytest

from kubetrain_operator.api import InvalidRun, SpecError, parse_run
from kubetrain_operator.plan import plan_run, upstream_model_uri
from runspecs import (
    DELETE,
    EXAMPLE_NAMES,
    VARIANTS,
    all_documents,
    changed,
    example,
    planned,
    string_leaves,
)

DOCUMENTS = all_documents()
STAGE_API_VERSION = "kubetrain.dev/stage-v1"  # architecture.md, "Stage contract"


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


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_stages_in_order_with_their_configs(name: str) -> None:
    doc = DOCUMENTS[name]
    run, plan = planned(doc)
    has_sanity = spec_get(doc, "spec.sanity") is not None
    expected = ["preprocess", *(["sanity"] if has_sanity else []), "train", "merge"]
    assert [s.name for s in plan.stages] == expected
    for stage in plan.stages:
        assert stage.config["apiVersion"] == STAGE_API_VERSION
        assert stage.config["stage"] == stage.name
        assert stage.config["run"] == doc["metadata"]["name"] == plan.run == run.name
    # Only the training stages are distributed (PyTorchJobs); the others are one process.
    assert [s.name for s in plan.stages if s.distributed] == expected[1:-1]


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
    assert train.config["distributed"]["worldSize"] == nodes * max(gpus, 1)
    assert train.config["distributed"]["zeroStage"] == spec_get(
        doc, "spec.distributed.zeroStage", 0
    )


@pytest.mark.parametrize("name", [n for n in sorted(DOCUMENTS) if "sanity" in DOCUMENTS[n]["spec"]])
def test_sanity_stage_is_a_short_gated_run_on_few_gpus(name: str) -> None:
    doc = DOCUMENTS[name]
    _, plan = planned(doc)
    sanity, train = plan.stage("sanity"), plan.stage("train")
    assert sanity is not None and train is not None
    gate = doc["spec"]["sanity"]
    run_gpus = spec_get(doc, "spec.resources.gpusPerNode", 1)
    # api.md: sanity.gpus defaults to 1, or 0 for CPU runs.
    gpus = gate.get("gpus", 1 if run_gpus > 0 else 0)
    assert (sanity.nodes, sanity.gpus_per_node, sanity.procs_per_node) == (1, gpus, max(gpus, 1))
    config = sanity.config
    assert config["training"]["maxSteps"] == gate.get("steps", 100)
    assert config["training"]["epochs"] is None
    assert config["sanity"] == {
        "minLossDrop": gate.get("minLossDrop", 0.10),
        "maxGradNorm": gate.get("maxGradNorm", 1000),
    }
    assert config["distributed"]["worldSize"] == max(gpus, 1)
    # The gate must not leave checkpoints where the real run resumes from.
    assert config["outputUri"] != train.config["outputUri"]
    assert train.config["sanity"] is None
    # Everything else trains the same model the same way.
    for key in ("method", "model", "adapter", "dpo", "datasetPointer"):
        assert config[key] == train.config[key], key
    for key in ("learningRate", "microBatchSize", "precision", "optimizer", "seed"):
        assert config["training"][key] == train.config["training"][key], key


@pytest.mark.parametrize("sanity_gpus", range(1, 9))
def test_no_stage_asks_one_node_for_more_gpus_than_a_node_has(sanity_gpus: int) -> None:
    """2 nodes × 4 GPUs: a sanity gate is either refused or fits the nodes (never 8 on one)."""
    doc = changed(
        example("tulu-sft"),
        {"spec.resources": {"nodes": 2, "gpusPerNode": 4}, "spec.sanity.gpus": sanity_gpus},
    )
    try:
        _, plan = planned(doc)
    except InvalidRun as refused:
        assert sanity_gpus > 4
        assert [p.path for p in refused.problems] == ["spec.sanity.gpus"]
        return
    for stage in plan.stages:
        assert stage.gpus_per_node <= 4, stage.name
    sanity = plan.stage("sanity")
    assert sanity is not None and sanity.nodes * sanity.gpus_per_node == sanity_gpus


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
    doc = DOCUMENTS[name]
    arch = doc["spec"]["model"]["architecture"]
    model = stage_config(doc, "train")["model"]["architecture"]
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
    train = data["train"] if isinstance(data["train"], list) else [data["train"]]
    if not any(u.startswith("pvc://") for u in train):
        assert config["train"] == train
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
        assert config["tokenizer"] == {"uri": tokenizer["uri"]}
    else:  # api.md: default is the model's own tokenizer
        assert config["tokenizer"] == {"uri": stage_config(doc, "train")["model"]["uri"]}


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
    assert merge.nodes == 1 and merge.gpus_per_node <= 1


# ------------------------------------------------------------------------------------- DeepSpeed

DEEPSPEED_CASES = [(0, "none"), (1, "none"), (2, "none"), (2, "cpu"), (3, "none"), (3, "cpu")]
NODES, GPUS, SANITY_GPUS, MICRO, ACCUM, CLIP = 2, 4, 2, 2, 3, 0.7


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


def parse_with_deepspeed(config: dict[str, Any], world_size: int) -> Any:
    """DeepSpeed's own parser: it asserts train_batch_size = micro × accumulation × world."""
    import deepspeed.runtime.config as ds_config

    with mock.patch.object(ds_config, "dist", _ProcessGroup(world_size)):
        return ds_config.DeepSpeedConfig(dict(config))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(("zero", "offload"), DEEPSPEED_CASES)
def test_deepspeed_config_per_zero_stage(zero: int, offload: str, precision: str) -> None:
    doc = deepspeed_doc(zero, offload, precision)
    for name, world in (("train", NODES * GPUS), ("sanity", SANITY_GPUS)):
        distributed = stage_config(doc, name)["distributed"]
        assert distributed["zeroStage"] == zero
        assert distributed["worldSize"] == world
        ds = distributed["deepspeed"]
        if zero == 0:
            assert ds is None, "zeroStage 0 is plain DDP: no DeepSpeed config"
            continue
        zero_cfg = ds["zero_optimization"]
        assert zero_cfg["stage"] == zero
        assert ds["train_micro_batch_size_per_gpu"] == MICRO
        assert ds["gradient_accumulation_steps"] == ACCUM
        assert ds["train_batch_size"] == MICRO * ACCUM * world
        assert ds["gradient_clipping"] == CLIP
        assert ds.get("bf16", {}).get("enabled", False) is (precision == "bf16")
        assert ds.get("fp16", {}).get("enabled", False) is (precision == "fp16")
        if zero == 3:  # testing.md: without it ZeRO-3 saves no weights
            assert zero_cfg["stage3_gather_16bit_weights_on_model_save"] is True
        optimizer_device = zero_cfg.get("offload_optimizer", {}).get("device", "none")
        param_device = zero_cfg.get("offload_param", {}).get("device", "none")
        assert optimizer_device == offload
        assert param_device == (offload if zero == 3 else "none")

        parsed = parse_with_deepspeed(ds, world)
        assert parsed.zero_optimization_stage == zero
        assert parsed.train_batch_size == MICRO * ACCUM * world
        assert parsed.gradient_clipping == CLIP
        assert parsed.bfloat16_config.enabled is (precision == "bf16")
        assert parsed.float16_config.enabled is (precision == "fp16")
        if zero == 3:
            assert parsed.zero_config.gather_16bit_weights_on_model_save is True
        if offload == "cpu":
            assert parsed.zero_config.offload_optimizer is not None
            assert str(parsed.zero_config.offload_optimizer.device).endswith("cpu")


def test_deepspeed_parser_check_can_fail() -> None:
    """The real parser is not a rubber stamp: a wrong world size or an unknown key is refused."""
    ds = stage_config(deepspeed_doc(3, "none", "bf16"), "train")["distributed"]["deepspeed"]
    with pytest.raises(AssertionError, match="train_batch_size"):
        parse_with_deepspeed(ds, NODES * GPUS + 1)
    bad = {**ds, "zero_optimization": {**ds["zero_optimization"], "stage3_gather": True}}
    with pytest.raises(Exception, match="stage3_gather"):
        parse_with_deepspeed(bad, NODES * GPUS)


# ------------------------------------------------------------------------------ preprocess key

DATA_CHANGES: dict[str, dict[str, Any]] = {
    "train files": {"spec.data.train": "s3://datasets/tulu-3-sft-mixture/other.jsonl"},
    "validation files": {
        "spec.data.validationFraction": DELETE,
        "spec.data.validation": "s3://datasets/tulu-3-sft-mixture/val.jsonl",
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
            "spec.resources.gpusPerNode": 4,
            "spec.maxRestarts": 1,
        },
    )
    assert preprocess_key(other) == key


# ------------------------------------------------------------------------------------ pvc:// URIs

PVC_FIELDS = {
    "spec.model.uri": ("spec.model.uri", "pvc://models/llama"),
    "spec.tokenizer.uri": ("spec.tokenizer", {"uri": "pvc://models/llama-tokenizer"}),
    "spec.data.train": ("spec.data.train", ["s3://d/a.jsonl", "pvc://datasets/b.jsonl"]),
    "spec.data.validation": ("spec.data.validation", "pvc://datasets/val.jsonl"),
    "spec.output.uri": ("spec.output.uri", "pvc://runs/llama31-support/"),
    "spec.storage.cacheRoot": ("spec.storage.cacheRoot", "pvc://cache"),
}


def test_pvc_uris_map_to_the_mount_root() -> None:
    doc = VARIANTS["pvc-everywhere"]
    _, plan = planned(doc)
    assert set(plan.pvc_claims) == {"models", "datasets", "runs", "cache"}
    preprocess, train = plan.stage("preprocess"), plan.stage("train")
    assert preprocess is not None and train is not None
    assert preprocess.config["train"] == [
        "/mnt/pvc/datasets/support/a.jsonl",
        "/mnt/pvc/datasets/support/b.jsonl",
    ]
    assert preprocess.config["validation"] == ["/mnt/pvc/datasets/support/val.jsonl"]
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
    "spec.tokenizer": {"uri": "hf://meta-llama/Llama-3.1-8B"},
    "spec.data.train": ["s3://d/a.jsonl", "hf://datasets/org/b.jsonl"],
}


@pytest.mark.parametrize("field", sorted(HF_FIELDS))
@pytest.mark.parametrize("target", ["cluster", "local"])
def test_hf_uris_are_refused_by_the_plan_naming_the_field(field: str, target: str) -> None:
    doc = changed(example("llama-lora-merge"), {field: HF_FIELDS[field]})
    parse_run(doc)  # the API reserves hf:// (api.md) …
    with pytest.raises(SpecError) as caught:  # … but no stage downloads from the Hub
        planned(doc, target=target)
    assert caught.value.path.startswith(field), caught.value.path
    assert "Hugging Face Hub" in caught.value.problem and "s3://" in caught.value.fix


def test_local_runs_keep_local_and_s3_uris() -> None:
    doc = example("tinystories-cpu")
    _, plan = planned(doc, target="local")
    assert plan.pvc_claims == ()
    preprocess = plan.stage("preprocess")
    assert preprocess is not None
    assert preprocess.config["train"] == [doc["spec"]["data"]["train"]]


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
        },
    )


@pytest.mark.parametrize(
    ("adapter", "merge", "folder"),
    [("lora", True, "merged"), ("qlora", True, "merged"), ("none", False, "final")],
)
def test_upstream_model_is_the_full_model(adapter: str, merge: bool, folder: str) -> None:
    # architecture.md: final/ holds the model (or only an adapter), merged/ the merged model.
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
            assert stage.config["tokenizer"] == {"uri": expected}
        else:
            assert stage.config["model"] == {"uri": expected, "quantized": False}


def test_from_run_on_a_pvc_is_mounted() -> None:
    up = upstream("lora", merge=True, output="pvc://runs/up")
    _, plan = planned(example("tulu-dpo"), upstream=up)
    assert "runs" in plan.pvc_claims
    train = plan.stage("train")
    assert train is not None and train.config["model"]["uri"] == "/mnt/pvc/runs/up/merged"
