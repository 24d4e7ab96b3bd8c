"""The stage contract: every config the operator's `plan` writes is one the trainer accepts as is.

Real: the operator's `plan_run` on every example and variant (LoRA, QLoRA, DPO, ZeRO-2/3 with
offload, sanity gates, multi-node, pvc://), the trainer's `kubetrain_trainer.config` loader, the
JSON text the ConfigMap carries, and `python -m kubetrain_trainer` (a subprocess) for the exit code.
Nothing is emulated. The two packages never import each other; this test is where they meet.
It also holds the one-source-of-defaults checks: the plan writes every field of every stage config
(no value falls back on a trainer default), any default the trainer keeps equals the API's, and
every trainer config field is documented.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from kubetrain_operator import api
from kubetrain_operator import plan as operator_plan
from kubetrain_trainer import config as tconfig
from kubetrain_trainer.config import (
    STAGE_API_VERSION,
    ConfigError,
    MergeConfig,
    PreprocessConfig,
    TrainConfig,
    dump_stage_config,
    load_stage_config,
    parse_stage_config,
)
from runspecs import ROOT, all_documents, rendered, stage_configs

DOCUMENTS = all_documents()
CLASS_BY_STAGE = {
    "preprocess": PreprocessConfig,
    "sanity": TrainConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
}
CASES = [
    (doc_id, file)
    for doc_id, doc in sorted(DOCUMENTS.items())
    for file in sorted(stage_configs(rendered(doc)))
]


def leaves(node: Any, path: str = "") -> dict[str, Any]:
    """Every scalar of a JSON tree by path (lists by index, empty containers kept)."""
    if isinstance(node, dict) and node:
        return {
            k: v for key, value in node.items() for k, v in leaves(value, f"{path}.{key}").items()
        }
    if isinstance(node, list) and node:
        return {
            k: v for i, item in enumerate(node) for k, v in leaves(item, f"{path}[{i}]").items()
        }
    return {path: node}


def test_both_sides_speak_the_same_version() -> None:
    assert operator_plan.STAGE_API_VERSION == STAGE_API_VERSION == "kubetrain.dev/stage-v1"


def stage_kind(file: str) -> str:
    """`sanity-2.json` → sanity: every rung is a sanity stage."""
    return file.removesuffix(".json").partition("-")[0]


def test_every_stage_of_every_document_is_covered() -> None:
    stages = {stage_kind(file) for _, file in CASES}
    assert stages == {"preprocess", "sanity", "train", "merge"}
    assert "sanity-3.json" in {file for _, file in CASES}  # a ladder
    variants = {
        "lora": any(
            d["spec"]["method"].get("adapter", {}).get("type") == "lora" for d in DOCUMENTS.values()
        ),
        "qlora": any(
            d["spec"]["method"].get("adapter", {}).get("type") == "qlora"
            for d in DOCUMENTS.values()
        ),
        "dpo": any(d["spec"]["method"]["stage"] == "dpo" for d in DOCUMENTS.values()),
        "zero3": any(
            d["spec"].get("distributed", {}).get("zeroStage") == 3 for d in DOCUMENTS.values()
        ),
        "offload": any(
            d["spec"].get("distributed", {}).get("offload") == "cpu" for d in DOCUMENTS.values()
        ),
        "sanity": any("sanity" in d["spec"] for d in DOCUMENTS.values()),
    }
    assert all(variants.values()), variants


@pytest.mark.parametrize(("doc_id", "file"), CASES)
def test_trainer_loads_what_the_operator_renders(doc_id: str, file: str, tmp_path: Path) -> None:
    """The ConfigMap's JSON text → the trainer's loader → the same values, and a stable dump."""
    text = stage_configs(rendered(DOCUMENTS[doc_id]))[file]
    data = json.loads(text)
    stage = stage_kind(file)

    config = parse_stage_config(data, file)
    assert isinstance(config, CLASS_BY_STAGE[stage])
    assert config.stage == stage

    # The trainer saw every value the operator wrote, unchanged (no silent coercion or loss).
    dumped = json.loads(dump_stage_config(config))
    written, seen = leaves(data), leaves(dumped)
    assert {path: seen.get(path, "<missing>") for path in written} == written

    # Round trip: dump → parse → the same config, and the dump is a fixed point.
    again = parse_stage_config(dumped, file)
    assert again == config
    assert dump_stage_config(again) == dump_stage_config(config)

    # The file the pod mounts loads the same way.
    path = tmp_path / file
    path.write_text(text, encoding="utf-8")
    assert load_stage_config(path) == config


def valid_train_config() -> dict[str, Any]:
    return json.loads(stage_configs(rendered(DOCUMENTS["tulu-sft"]))["train.json"])


BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "unknown top-level field": ({"learningRate": 1e-4}, "learningRate"),
    "unknown nested field": ({"training.learningRat": 1e-4}, "learningRat"),
    "unknown adapter field": ({"adapter.rank": 8}, "rank"),
    "wrong apiVersion": ({"apiVersion": "kubetrain.dev/stage-v2"}, "apiVersion"),
    "missing apiVersion": ({"apiVersion": None}, "apiVersion"),
    "unknown stage": ({"stage": "evaluate"}, "stage"),
    "wrong type": ({"training.microBatchSize": "two"}, "microBatchSize"),
    "sanity stage without its gate": ({"stage": "sanity"}, "sanity"),
    "missing field": ({"datasetPointer": None}, "datasetPointer"),
    "value out of range": ({"distributed.zeroStage": 5}, "zeroStage"),
    "value not allowed": ({"training.precision": "fp8"}, "precision"),
}
#: What each message must tell the user to do (every line also says it after a dash).
FIXES = {
    "unknown top-level field": "same release",
    "unknown nested field": "same release",
    "unknown adapter field": "remove it from a hand-written config",
    "wrong apiVersion": "align them",
    "missing apiVersion": "align them",
    "unknown stage": "same release",
    "wrong type": "write the value with that JSON type",
    "sanity stage without its gate": "fix it in the TrainingRun",
    "missing field": "required field is missing — set it",
    "value out of range": "use a value in that range",
    "value not allowed": "use one of these values",
}


def with_change(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    out = json.loads(json.dumps(data))
    node = out
    for part in parents:
        node = node[part]
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_trainer_rejects_configs_it_does_not_understand(case: str) -> None:
    (change,), needle = BROKEN[case][0].items(), BROKEN[case][1]
    data = with_change(valid_train_config(), *change)
    with pytest.raises(ConfigError) as caught:
        parse_stage_config(data, "train.json")
    assert needle in str(caught.value)
    assert str(caught.value).startswith("train.json")
    assert FIXES[case] in str(caught.value)
    assert all(" — " in line for line in str(caught.value).splitlines()), str(caught.value)


@pytest.mark.parametrize("case", ["unknown top-level field", "wrong apiVersion"])
def test_trainer_exits_2_on_a_bad_config(case: str, tmp_path: Path) -> None:
    """Exit code 2 = invalid config, do not retry (architecture.md)."""
    (change,), _ = BROKEN[case][0].items(), BROKEN[case][1]
    config = tmp_path / "train.json"
    config.write_text(json.dumps(with_change(valid_train_config(), *change)), encoding="utf-8")
    argv = ["-m", "kubetrain_trainer", "train", "--config", str(config), "--workdir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    result = json.loads((tmp_path / "result-train.json").read_text(encoding="utf-8"))
    assert result["ok"] is False


def test_a_renamed_operator_field_breaks_the_contract() -> None:
    """The contract test can fail: an operator that renames a field is caught by the trainer."""
    data = valid_train_config()
    distributed = dict(data["distributed"])
    distributed["worldsize"] = distributed.pop("worldSize")
    with pytest.raises(ConfigError, match="worldsize"):
        parse_stage_config({**data, "distributed": distributed})


# ----------------------------------------------------------------------- one source of defaults

#: Trainer config classes and the API models whose defaults they must share (same field names).
DEFAULT_PAIRS = [
    (tconfig.Optimization, api.TrainingSpec, {}),
    (tconfig.Checkpointing, api.CheckpointSpec, {}),
    (tconfig.AdapterConfig, api.Adapter, {}),
    (tconfig.DPOConfig, api.DPOSettings, {}),
    (tconfig.Architecture, api.Architecture, {}),
    (tconfig.TokenizerTrain, api.TokenizerTraining, {}),
    (tconfig.Distributed, api.DistributedSpec, {}),
    (tconfig.S3Settings, api.S3Spec, {}),
    (tconfig.PreprocessConfig, api.DataSpec, {}),
    (tconfig.PreprocessConfig, api.Packing, {}),
    (tconfig.Fields, api.DataSpec, {name: f"{name}_field" for name in tconfig.Fields.model_fields}),
    (tconfig.MergeConfig, api.TrainingSpec, {}),
    (tconfig.MergeConfig, api.OutputSpec, {}),
]


def _default(info: Any) -> Any:
    value = info.get_default(call_default_factory=True)
    return value.model_dump(by_alias=True) if hasattr(value, "model_dump") else value


def trainer_defaults_that_disagree() -> list[str]:
    """Every trainer default that differs from the API's default of the same field."""
    wrong = []
    for trainer_cls, api_cls, names in DEFAULT_PAIRS:
        for name, info in trainer_cls.model_fields.items():
            api_name = names.get(name, name)
            if info.is_required() or api_name not in api_cls.model_fields:
                continue
            ours, theirs = _default(info), _default(api_cls.model_fields[api_name])
            if ours != theirs and not (ours in ([], None) and theirs in ([], None)):
                wrong.append(f"{trainer_cls.__name__}.{name}: {ours!r} ≠ API {theirs!r}")
    for name in ("min_loss_drop", "max_grad_norm"):
        info = tconfig.SanityGate.model_fields[name]
        if not info.is_required() and _default(info) != api.RUNG_DEFAULTS[name]:
            wrong.append(f"SanityGate.{name}: {_default(info)!r} ≠ API {api.RUNG_DEFAULTS[name]!r}")
    for cls in (tconfig.PreprocessConfig, tconfig.TrainConfig, tconfig.MergeConfig):
        info = cls.model_fields["metrics_port"]
        if not info.is_required() and _default(info) != operator_plan.METRICS_PORT:
            wrong.append(f"{cls.__name__}.metrics_port ≠ the plan's {operator_plan.METRICS_PORT}")
    return wrong


def test_trainer_defaults_agree_with_the_api() -> None:
    """The API's defaults are the only defaults: a trainer default may only repeat them."""
    assert len(DEFAULT_PAIRS) >= 10
    assert trainer_defaults_that_disagree() == []


def test_the_default_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    field = tconfig.Optimization.model_fields["warmup_ratio"]
    monkeypatch.setattr(field, "default", 0.0)  # the value this check once caught
    assert trainer_defaults_that_disagree() == ["Optimization.warmup_ratio: 0.0 ≠ API 0.03"]


def unwritten_fields(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Trainer config fields (wire names) that a written config leaves to a trainer default."""
    missing = []
    for name, info in model.model_fields.items():
        wire = info.alias or name
        if wire not in data:
            missing.append(f"{path}{wire}")
            continue
        nested = [
            a
            for a in typing.get_args(info.annotation) or (info.annotation,)
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if nested and isinstance(data[wire], dict):
            missing += unwritten_fields(nested[0], data[wire], f"{path}{wire}.")
    return missing


@pytest.mark.parametrize(("doc_id", "file"), CASES)
def test_plan_writes_every_field_of_the_stage_config(doc_id: str, file: str) -> None:
    """No value of a rendered stage reaches the trainer as the trainer's own default."""
    data = json.loads(stage_configs(rendered(DOCUMENTS[doc_id]))[file])
    model = CLASS_BY_STAGE[stage_kind(file)]
    assert unwritten_fields(model, data) == []


def test_every_trainer_config_field_is_documented() -> None:
    undocumented = [
        f"{cls.__name__}.{name}"
        for cls in vars(tconfig).values()
        if isinstance(cls, type)
        and issubclass(cls, BaseModel)
        and cls.__module__ == tconfig.__name__
        for name, info in cls.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert undocumented == []
