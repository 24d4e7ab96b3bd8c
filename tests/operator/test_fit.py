"""Fits before it spends: the plan's memory check, `kubetrain fit`, and the operator's refusal.

Real: the API model, the plan, the contract's memory model, the CLI's main() and the status
derivation, on the shipped examples and on the model configs in examples/models/. Nothing is
emulated; the memory model's numbers themselves are validated in test_memory_model.py (against
DeepSpeed's estimators) and tests/trainer/test_memory_measured.py (against tensors after a step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_contract import memory
from kubetrain_operator import cli, fit
from kubetrain_operator.api import parse_run
from kubetrain_operator.cluster_defaults import ClusterDefaults
from kubetrain_operator.documents import ModelConfigError, read_model_shape
from kubetrain_operator.plan import plan_run, upstream_model_uri
from kubetrain_operator.status.actions import EnsureObject
from kubetrain_operator.status.derive import derive_status
from runspecs import DELETE, EXAMPLES, LOCAL_ONLY, changed, example, upstream_docs

MODELS = EXAMPLES / "models"
#: The model each example trains, as its config.json (None: sized from model.architecture).
MODEL_OF = {
    "llama-lora-merge": "llama-3.1-8b.json",
    "mistral-qlora": "mistral-7b-v0.3.json",
    "mixture-cpu": None,
    "policy-mixture": "mistral-7b-v0.3.json",
    "tinystories": None,
    "tinystories-cpu": None,
    "tulu-dpo": "llama-3.1-8b.json",
    "tulu-sft": "llama-3.1-8b.json",
    "tulu-sft-hub": "llama-3.1-8b.json",
}
GPU_EXAMPLES = [n for n in sorted(MODEL_OF) if n not in LOCAL_ONLY]


def plan_example(doc: dict[str, Any], model: str | None, **kwargs: Any) -> Any:
    run = parse_run(doc)
    upstream = None
    if run.spec.model.from_run is not None:
        upstream = upstream_model_uri(parse_run(upstream_docs()[run.spec.model.from_run]))
    shape = read_model_shape(MODELS / model) if model else None
    return plan_run(run, upstream_model=upstream, model_shape=shape, **kwargs)


def test_every_example_is_listed() -> None:
    assert sorted(MODEL_OF) == sorted(p.stem for p in EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_every_stage_and_rung_of_every_gpu_example_fits_its_declared_gpu(name: str) -> None:
    plan = plan_example(example(name), MODEL_OF[name])
    report = plan.fit_report
    assert report is not None and report.capacity is not None, f"{name} declares no GPU memory"
    gpu_rows = [r for r in report.rows if r["device"] == "gpu"]
    assert {r["stage"] for r in gpu_rows} == {s.name for s in plan.stages if s.role != "preprocess"}
    assert all(r["fits"] for r in gpu_rows), [r for r in gpu_rows if not r["fits"]]
    assert report.refusals == ()


def test_the_shipped_dpo_ladder_is_seed_003s_and_holds_one_model() -> None:
    plan = plan_example(example("tulu-dpo"), "llama-3.1-8b.json")
    setups = [memory.Setup.from_dict(s.config["memory"]["setup"]) for s in plan.sanity_stages]
    assert [(s.world_size, s.zero_stage, s.optimizer) for s in setups] == [
        (1, 0, "paged_adamw_8bit"),
        (2, 3, "adamw_torch"),
        (8, 3, "adamw_torch"),
    ]
    assert {s.reference for s in setups} == {"precomputed"}
    assert all(s.weight_precision == "bf16" for s in setups)


#: The examples as they shipped before the fit check: each one over its GPU the way the issue
#: counted (DPO's 1-GPU rung inherited ZeRO-3 with AdamW and a reference copy; SFT loaded fp32).
BEFORE = {
    "tulu-dpo": {
        "spec.method.dpo": {"beta": 0.1},
        "spec.training.weightPrecision": "fp32",
        "spec.sanity": {"steps": 20, "gpus": 1, "minLossDrop": 0.0},
    },
    "tulu-sft": {"spec.training.weightPrecision": "fp32"},
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_the_examples_as_they_were_are_refused_with_the_way_out(name: str) -> None:
    doc = changed(example(name), BEFORE[name])
    with pytest.raises(fit.DoesNotFit) as refused:
        plan_example(doc, "llama-3.1-8b.json")
    first = refused.value.errors[0]
    assert first.path in ("spec.sanity", "spec.sanity.rungs[0]")
    message = first.problem
    assert "sanity-1 on 1 process(es) needs about" in message
    assert "the GPU has 80.0 GiB" in message
    assert message.count(" GiB") >= 5  # the estimate, the GPU and three terms
    assert "fits with: " in message


def test_each_offered_fix_really_fits() -> None:
    """The fixes are re-estimated, not guessed: apply the first one and the rung fits."""
    doc = changed(example("tulu-sft"), BEFORE["tulu-sft"])
    with pytest.raises(fit.DoesNotFit) as refused:
        plan_example(doc, "llama-3.1-8b.json")
    message = refused.value.errors[0].problem
    assert "spec.training.weightPrecision: bf16" in message
    fixed = changed(doc, {"spec.training.weightPrecision": "bf16"})
    assert plan_example(fixed, "llama-3.1-8b.json").fit_report.refusals == ()


def test_a_pod_too_small_for_the_offloaded_state_is_refused() -> None:
    doc = changed(example("tulu-sft"), {"spec.resources.memory": "100Gi"})
    with pytest.raises(fit.DoesNotFit) as refused:
        plan_example(doc, "llama-3.1-8b.json")
    [error] = refused.value.errors
    assert error.path == "spec.sanity.rungs[1]"
    assert "offloads about" in error.problem and "resources.memory" in error.problem


@pytest.mark.parametrize(
    ("resources", "defaults", "expected"),
    [
        ({"gpuMemory": "40Gi"}, None, (40 * memory.GIB, "resources.gpuMemory")),
        (
            {"nodeSelector": {"nvidia.com/gpu.memory": "81559"}},
            None,
            (81559 * 1024**2, "nodeSelector nvidia.com/gpu.memory=81559"),
        ),
        (
            {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            None,
            (80 * memory.GIB, "nodeSelector nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"),
        ),
        ({}, "24Gi", (24 * memory.GIB, "the cluster default trainer.gpuMemory")),
        ({"gpuMemory": "40Gi"}, "24Gi", (40 * memory.GIB, "resources.gpuMemory")),
        ({"nodeSelector": {"nvidia.com/gpu.product": "Some-Future-GPU"}}, None, None),
        ({}, None, None),
    ],
)
def test_the_gpu_memory_comes_from_the_spec_then_the_labels_then_the_cluster(
    resources: dict[str, Any], defaults: str | None, expected: tuple[int, str] | None
) -> None:
    doc = changed(example("llama-lora-merge"), {"spec.resources": {"gpusPerNode": 1, **resources}})
    cap = fit.capacity(parse_run(doc).spec, ClusterDefaults(gpu_memory=defaults))
    assert (None if cap is None else (cap.bytes, cap.source)) == expected


def test_a_model_built_here_is_sized_by_the_plan_and_refused_there() -> None:
    doc = changed(example("tinystories"), {"spec.resources.gpuMemory": "4Gi"})
    with pytest.raises(fit.DoesNotFit) as refused:
        plan_example(doc, None)
    assert {e.path for e in refused.value.errors} == {"spec.sanity", "spec.training"}
    assert "fits with: spec.training.microBatchSize: 8" in str(refused.value)  # the cheapest


def test_a_model_only_its_config_json_knows_is_checked_by_the_preprocess_stage() -> None:
    plan = plan_example(example("tulu-sft"), None)
    assert plan.fit_report is None
    request = plan.stage("preprocess").config["fit"]
    assert request["gpuMemoryBytes"] == 80 * memory.GIB
    assert request["modelUri"] == "s3://models/meta-llama/Llama-3.1-8B"
    names = [s["stage"] for s in request["setups"]]
    assert names == ["sanity-1", "sanity-2", "sanity-3", "train", "merge"]
    # every setup is the one its stage re-checks on the device
    by_stage = {s.name: s.config["memory"]["setup"] for s in plan.stages if s.role != "preprocess"}
    assert [by_stage[n] for n in names] == request["setups"]


def test_the_fit_request_does_not_change_the_dataset_job() -> None:
    """GPU memory is not data: changing it keeps the preprocess key (and its Job)."""
    a = plan_example(example("tulu-sft"), None)
    b = plan_example(changed(example("tulu-sft"), {"spec.resources.gpuMemory": "141Gi"}), None)
    assert a.stage("preprocess").config["fit"] != b.stage("preprocess").config["fit"]
    assert a.preprocess_key == b.preprocess_key


def test_without_a_gpu_memory_nothing_is_checked_and_nothing_asked() -> None:
    doc = changed(example("tulu-sft"), {"spec.resources.nodeSelector": {}})
    plan = plan_example(doc, "llama-3.1-8b.json")
    assert plan.fit_report is not None and plan.fit_report.capacity is None
    assert all(r["fits"] is None for r in plan.fit_report.rows)
    assert plan.stage("preprocess").config["fit"] is None


def test_a_rung_s_offload_reaches_its_deepspeed_config_only() -> None:
    plan = plan_example(example("tulu-sft"), None)
    ds = [s.config["distributed"]["deepspeed"] for s in plan.sanity_stages]
    assert ds[0] is None
    assert ds[1]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_optimizer" not in ds[2]["zero_optimization"]


def test_the_operator_refuses_a_run_that_cannot_fit_before_any_child() -> None:
    doc = changed(example("tinystories"), {"spec.resources.gpuMemory": "4Gi"})
    body = {**doc, "metadata": {**doc["metadata"], "namespace": "ml", "generation": 1}}
    status, actions = derive_status(body, children=[], pods=[], progress=None, now=0.0)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Failed"
    assert conditions["Stalled"]["reason"] == "DoesNotFit"
    assert "spec.sanity: sanity-1 on 1 process(es) needs about" in conditions["Stalled"]["message"]
    assert not [a for a in actions if isinstance(a, EnsureObject)]


# ------------------------------------------------------------------------------------- the CLI

SMALL_GPU_SFT = changed(example("tulu-sft"), {"spec.resources.gpuMemory": "40Gi"})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_kubetrain_fit_prints_every_stage_and_rung(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        [
            "fit",
            str(EXAMPLES / "tulu-sft.yaml"),
            str(EXAMPLES / "tulu-dpo.yaml"),
            "--model-config",
            str(MODELS / "llama-3.1-8b.json"),
        ],
        capsys,
    )
    assert code == 0, err
    assert out.count("8.03B parameters") == 2
    for stage in ("sanity-1", "sanity-2", "sanity-3", "train", "merge"):
        assert out.count(f"\n  {stage} ") == 2
    assert " NO " not in out


def test_kubetrain_fit_exits_1_naming_the_file_and_rung(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(
        yaml.safe_dump(changed(example("tulu-sft"), {"spec.resources.gpuMemory": "40Gi"}))
    )
    code, out, err = run_cli(
        ["fit", str(path), "--model-config", f"llama31-tulu-sft={MODELS / 'llama-3.1-8b.json'}"],
        capsys,
    )
    assert code == 1
    assert "  sanity-1 " in out and " NO " in out
    assert err.startswith(f"{path}: spec.sanity.rungs[0]: sanity-1 on 1 process(es)")


def test_validate_refuses_what_does_not_fit_and_notes_what_it_cannot_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small.yaml"
    small.write_text(
        yaml.safe_dump(changed(example("tulu-sft"), {"spec.resources.gpuMemory": "40Gi"}))
    )
    config = f"--model-config={MODELS / 'llama-3.1-8b.json'}"
    code, _, err = run_cli(["validate", str(small), config], capsys)
    assert code == 1 and "spec.sanity.rungs[0]: sanity-1" in err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        yaml.safe_dump_all(
            [
                changed(example("llama-lora-merge"), {"spec.resources.gpuMemory": DELETE}),
                changed(
                    example("mistral-qlora"),
                    {"spec.resources.nodeSelector": {}, "metadata.name": "other"},
                ),
            ]
        )
    )
    code, _, err = run_cli(["validate", str(unknown)], capsys)
    assert code == 0, err
    assert err.count("note: no fit check for") == 1
    assert "llama31-lora-merge, other" in err


def test_a_model_config_that_is_not_one_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ModelConfigError, match=r"num_attention_heads: expected a positive"):
        read_model_shape(tmp_path)
    code, _, err = run_cli(
        ["fit", str(EXAMPLES / "tulu-sft.yaml"), "--model-config", str(tmp_path / "none.json")],
        capsys,
    )
    assert code == 1 and "none.json: cannot read the model's config.json" in err


@pytest.mark.parametrize(
    "text", ["80Gi", "81559Mi", "512Gi", "500M", "1500m", "0.5Gi", "64", "3k", "1.5T", "2P", "1Ei"]
)
def test_every_quantity_the_api_admits_is_read_as_kubernetes_reads_it(text: str) -> None:
    """resources.memory and gpuMemory take any Kubernetes quantity; the fit check reads them in
    bytes as the Kubernetes client does (a suffix it could not read used to stop the plan)."""
    from kubernetes.utils import parse_quantity

    assert memory.quantity_bytes(text) == int(parse_quantity(text))
    doc = changed(example("tulu-sft"), {"spec.resources.memory": text})
    assert plan_example(doc, None).stage("preprocess").config["fit"] is not None
