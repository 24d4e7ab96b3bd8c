"""The stage contract: every config the operator's `plan` writes is one the trainer accepts as is.

Real: the operator's `plan_run` on every example and variant (LoRA, QLoRA, DPO, ZeRO-2/3 with
offload, sanity gates, multi-node, pvc://), the trainer's `kubetrain_trainer.config` loader, the
JSON text the ConfigMap carries, and `python -m kubetrain_trainer` (a subprocess) for the exit code.
Nothing is emulated. The two packages never import each other; this test is where they meet.
It also holds the one-source-of-defaults checks: the plan writes every field of every stage config
(no value falls back on a trainer default), every field the plan always writes is required by the
trainer (no default at all), any default the trainer keeps equals the API's, and every trainer
config field is documented.
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
    ConfigError,
    MergeConfig,
    PreprocessConfig,
    TrainConfig,
    dump_stage_config,
    load_stage_config,
    parse_stage_config,
)
from runspecs import ROOT, all_documents, local_documents, planned, rendered, stage_configs

DOCUMENTS = all_documents()
CLASS_BY_STAGE: dict[str, type[BaseModel]] = {
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


@pytest.mark.slow  # starts a stage or operator process
@pytest.mark.parametrize("case", ["unknown top-level field", "wrong apiVersion"])
def test_trainer_exits_2_on_a_bad_config(case: str, tmp_path: Path) -> None:
    """Exit code 2 = invalid config, do not retry (docs/architecture.md)."""
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
    # The settings of storage calls made without a stage config are the API's S3 defaults.
    for name in tconfig.S3Settings.model_fields:
        ours, theirs = getattr(tconfig.AWS_S3, name), _default(api.S3Spec.model_fields[name])
        if ours != theirs:
            wrong.append(f"AWS_S3.{name}: {ours!r} ≠ API {theirs!r}")
    return wrong


def test_trainer_defaults_agree_with_the_api() -> None:
    """The API's defaults are the only defaults: a trainer default may only repeat them."""
    assert len(DEFAULT_PAIRS) >= 10
    assert trainer_defaults_that_disagree() == []


def test_the_default_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    field = tconfig.Optimization.model_fields["warmup_ratio"]
    monkeypatch.setattr(field, "default", 0.0)  # the value this check once caught
    assert trainer_defaults_that_disagree() == ["Optimization.warmup_ratio: 0.0 ≠ API 0.03"]


def _nested_model(info: Any) -> type[BaseModel] | None:
    """The config class a field holds (directly or as `X | None`), or None for a plain value."""
    for arg in typing.get_args(info.annotation) or (info.annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


#: Trainer config fields that keep a default, with the reason: only a field the plan may leave out
#: of a stage config can have one. None today — the plan writes every field (null where unset).
DEFAULTS_THE_PLAN_RELIES_ON: dict[str, str] = {}


def planned_stage_configs() -> list[dict[str, Any]]:
    """The config of every stage of every example and test spec, for a cluster and locally."""
    cluster = [planned(doc)[1] for doc in DOCUMENTS.values()]
    local = [planned(doc, target="local")[1] for doc in local_documents().values()]
    return [stage.config for plan in (*cluster, *local) for stage in plan.stages]


PLANNED = planned_stage_configs()


def written_keys(
    model: type[BaseModel], data: dict[str, Any], seen: dict[type[BaseModel], list[set[str]]]
) -> None:
    """Record the wire keys of `data` for `model` and, below it, for every nested config block."""
    seen.setdefault(model, []).append(set(data))
    for name, info in model.model_fields.items():
        nested, value = _nested_model(info), data.get(info.alias or name)
        for item in value if isinstance(value, list) else [value]:
            if nested is not None and isinstance(item, dict):
                written_keys(nested, item, seen)


def always_written() -> dict[type[BaseModel], set[str]]:
    """Per trainer config class: the wire keys the plan writes every time it writes that block."""
    seen: dict[type[BaseModel], list[set[str]]] = {}
    for config in PLANNED:
        written_keys(CLASS_BY_STAGE[stage_kind(config["stage"])], config, seen)
    return {cls: set.intersection(*keys) for cls, keys in seen.items()}


def fields_with_defaults() -> dict[str, bool]:
    """`Class.field` of each trainer config field with a default → whether the plan always
    writes it."""
    written = always_written()
    return {
        f"{cls.__name__}.{name}": (info.alias or name) in written.get(cls, set())
        for cls in CONFIG_CLASSES
        for name, info in cls.model_fields.items()
        if not info.is_required()
    }


CONFIG_CLASSES = [
    cls
    for cls in vars(tconfig).values()
    if isinstance(cls, type)
    and issubclass(cls, BaseModel)
    and cls.__module__ == tconfig.__name__
    and cls.model_fields
]


def test_the_plan_reaches_every_trainer_config_class() -> None:
    """The enumeration below sees every config block (else a class could keep defaults unseen)."""
    assert len(PLANNED) > 4 * len(DOCUMENTS)
    assert set(always_written()) == set(CONFIG_CLASSES)


def test_fields_the_plan_always_writes_have_no_trainer_default() -> None:
    """A field the plan always writes is required: the API's defaults are the only defaults.
    Any default left must be one the plan relies on, listed with its reason."""
    defaults = fields_with_defaults()
    assert [field for field, written in defaults.items() if written] == []
    assert sorted(defaults) == sorted(DEFAULTS_THE_PLAN_RELIES_ON)


def test_the_required_field_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls, name, default in (
        (tconfig.S3Settings, "allow_insecure_endpoint", False),
        (tconfig.MergeConfig, "max_perplexity", None),
        (tconfig.PreprocessConfig, "document_separator", None),
    ):
        monkeypatch.setattr(cls.model_fields[name], "default", default)
    assert fields_with_defaults() == {
        "S3Settings.allow_insecure_endpoint": True,
        "MergeConfig.max_perplexity": True,
        "PreprocessConfig.document_separator": True,
    }


def test_a_config_missing_a_field_is_refused_naming_it() -> None:
    """No silent fallback: leaving out a field the plan writes is an error, not a default."""
    data = valid_train_config()
    for dotted in ("s3.allowInsecureEndpoint", "training.warmupRatio", "adapter.targetModules"):
        with pytest.raises(ConfigError, match=dotted.rpartition(".")[2]) as caught:
            parse_stage_config(with_change(data, dotted, None), "train.json")
        assert "required field is missing" in str(caught.value)


def unwritten_fields(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Trainer config fields (wire names) that a written config leaves to a trainer default."""
    missing = []
    for name, info in model.model_fields.items():
        wire = info.alias or name
        if wire not in data:
            missing.append(f"{path}{wire}")
            continue
        nested = _nested_model(info)
        if nested is not None and isinstance(data[wire], dict):
            missing += unwritten_fields(nested, data[wire], f"{path}{wire}.")
    return missing


@pytest.mark.parametrize(("doc_id", "file"), CASES)
def test_plan_writes_every_field_of_the_stage_config(doc_id: str, file: str) -> None:
    """No value of a rendered stage reaches the trainer as the trainer's own default."""
    data = json.loads(stage_configs(rendered(DOCUMENTS[doc_id]))[file])
    model = CLASS_BY_STAGE[stage_kind(file)]
    assert unwritten_fields(model, data) == []


def test_every_trainer_config_field_is_documented() -> None:
    undocumented = [
        f"{cls.__name__}{'' if name is None else '.' + name}"
        for cls in CONFIG_CLASSES
        for name, text in [
            (None, cls.__doc__),
            *((n, info.description) for n, info in cls.model_fields.items()),
        ]
        if not (text or "").strip()
    ]
    assert len(CONFIG_CLASSES) >= 14
    assert undocumented == []
