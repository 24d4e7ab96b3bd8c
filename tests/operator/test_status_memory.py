"""Measured beside estimated in the status: each sanity rung's peak memory and throughput, the
training progress's peak against its estimate, the 95% warning, and the preprocess stage's fit
table — pure, nothing emulated.

Real: `derive_status` over a run's world (tests/support/status_world.py, which validates every
derived status against the generated CRD's status schema as the API server would), the
trainer's metric registry and its text exposition parsed by the operator's scrape parser, and
the memory model's own fit rows (kubetrain_contract.memory.row). The world's children and pods
are a dictionary changed as the controllers would change them, as in test_status.py.
"""

from __future__ import annotations

from typing import Any

from bench.memory_probe import LLAMA_8B
from prometheus_client import generate_latest

from kubetrain_contract import memory
from kubetrain_contract import metrics as names
from kubetrain_operator import status as st
from kubetrain_operator.progress import parse_samples
from kubetrain_operator.run_status import FIT_ROWS
from kubetrain_operator.status import Progress
from kubetrain_trainer.metrics import TrainerMetrics
from operator_support import PREPROCESS_RESULT, result, run_doc
from status_world import World, sanity_spec, status_schema_errors, through_data, train_result

GIB = 1024**3
GATE = {"firstLoss": 2.45, "lastLoss": 2.12, "lossDrop": 0.135, "maxGradNorm": 3.0, "steps": 10}


def measured(peak_gib: float, device_gib: int | None = 80, **more: Any) -> dict[str, Any]:
    """A train/sanity result's measured keys (contract-17): a GPU rung, or CPU without device."""
    gpu = device_gib is not None
    return {
        "memoryPeakAllocatedBytes": int(peak_gib * GIB) if gpu else None,
        "memoryPeakReservedBytes": int((peak_gib + 1) * GIB) if gpu else None,
        "memoryPeakRssBytes": 9 * GIB,
        "deviceMemoryBytes": None if device_gib is None else device_gib * GIB,
        "memoryEstimateBytes": 58 * GIB,
        "tokensPerSecond": 5432.44,
        **more,
    }


def finish_rung(world: World, **fields: Any) -> None:
    name = sorted(n for n in world.children if "sanity" in n)[0]
    world.set_state(name, "running")
    world.step()
    ok = fields.pop("ok", True)
    world.set_state(
        name,
        "succeeded" if ok else "failed",
        message=result("sanity", ok, **fields),
        **({} if ok else {"exit_code": 3}),
    )
    world.step()


def test_a_rungs_peak_estimate_and_throughput_reach_status_sanity() -> None:
    world = World(run_doc(sanity=sanity_spec(1)))
    through_data(world)
    finish_rung(world, sanity=GATE, **measured(61.25))
    rung = world.status["sanity"][0]
    assert rung["peakMemoryBytes"] == int(61.25 * GIB)  # the allocated peak on a GPU
    assert rung["peakReservedBytes"] == int(62.25 * GIB)
    assert rung["memoryEstimateBytes"] == 58 * GIB
    assert rung["deviceMemoryBytes"] == 80 * GIB
    assert rung["tokensPerSecond"] == 5432.4
    assert rung["passed"] is True and rung["firstLoss"] == 2.45
    passed = world.condition(st.SANITY_PASSED)
    assert passed["status"] == "True"
    assert "warning" not in passed["message"]  # 78% of the GPU reserved


def test_a_cpu_rung_reports_its_peak_rss_and_no_gpu_figures() -> None:
    world = World(run_doc(sanity=sanity_spec(1)))
    through_data(world)
    finish_rung(world, sanity=GATE, **measured(0, device_gib=None))
    rung = world.status["sanity"][0]
    assert rung["peakMemoryBytes"] == 9 * GIB
    assert "peakReservedBytes" not in rung and "deviceMemoryBytes" not in rung
    assert "warning" not in world.condition(st.SANITY_PASSED)["message"]


def test_a_rung_past_95_percent_of_its_gpu_warns_with_figures_and_the_way_out() -> None:
    world = World(run_doc(sanity=sanity_spec(1)))
    through_data(world)
    finish_rung(world, sanity=GATE, **measured(76.1))  # 77.1 GiB reserved of 80
    passed = world.condition(st.SANITY_PASSED)
    assert passed["status"] == "True"  # a warning, not a failure: the next stage starts
    assert world.child("train")
    message = passed["message"]
    assert message.startswith("rung 1/1: loss 2.45 → 2.12 in 10 steps — warning: ")
    assert "peak 77.1 GiB reserved (76.1 GiB allocated) of the GPU's 80.0 GiB (96%)" in message
    assert "estimated 58.0 GiB" in message
    assert "spec.training.gradientCheckpointing: true" in message
    assert "spec.training.microBatchSize" in message
    rung_field = "spec.sanity.rungs[0]" if "rungs" in sanity_spec(1) else "spec.sanity"
    assert f"(this rung: {rung_field}.microBatchSize)" in message


def test_exactly_95_percent_does_not_warn_and_a_failed_rung_warns_too() -> None:
    world = World(run_doc(sanity=sanity_spec(1)))
    through_data(world)
    at_limit = measured(0, memoryPeakAllocatedBytes=70 * GIB, memoryPeakReservedBytes=76 * GIB)
    finish_rung(world, sanity=GATE, **at_limit)  # 76 of 80 GiB: 95.0%
    assert "warning" not in world.condition(st.SANITY_PASSED)["message"]

    world = World(run_doc(sanity=sanity_spec(1)))
    through_data(world)
    error = "sanity gate failed: loss 2.4500 → 2.4400 in 10 steps is a 0.4% drop"
    finish_rung(world, ok=False, error=error, reason="SanityLossFlat", **measured(78))
    failed = world.condition(st.SANITY_PASSED)
    assert failed["reason"] == st.R_SANITY_FAILED
    assert error in failed["message"] and "warning: peak 79.0 GiB reserved" in failed["message"]
    assert world.status["sanity"][0]["peakMemoryBytes"] == 78 * GIB


def test_figures_of_the_wrong_type_are_left_out_not_written() -> None:
    world = World(run_doc(sanity=sanity_spec(1)))
    through_data(world)
    broken = measured(
        0,
        memoryPeakAllocatedBytes="lots",
        memoryPeakReservedBytes=-1,
        deviceMemoryBytes=True,
        tokensPerSecond=float("nan"),
    )
    finish_rung(world, sanity=GATE, **broken)
    rung = world.status["sanity"][0]
    assert rung["peakMemoryBytes"] == 9 * GIB  # falls back to the RSS
    assert not {"peakReservedBytes", "deviceMemoryBytes", "tokensPerSecond"} & set(rung)


def scraped(world: World, *, cuda: bool) -> Progress:
    """What the trainer's registry exposes during a step, through the operator's parser."""
    trainer = TrainerMetrics("r")
    trainer.step.labels(run="r").set(10)
    trainer.memory_peak.labels(run="r", kind="rss").set(9 * GIB)
    trainer.memory_estimate.labels(run="r").set(58 * GIB)
    if cuda:
        trainer.memory_peak.labels(run="r", kind="allocated").set(61 * GIB)
        trainer.memory_peak.labels(run="r", kind="reserved").set(63 * GIB)
        trainer.device_memory.labels(run="r").set(80 * GIB)
    return Progress(parse_samples(generate_latest(trainer.registry).decode()), world.now)


def test_training_progress_shows_the_scraped_peak_against_the_estimate() -> None:
    for cuda, peak in ((True, 61 * GIB), (False, 9 * GIB)):
        world = World(run_doc())
        through_data(world)
        world.set_state(world.child("train")["metadata"]["name"], "running")
        world.step(scraped(world, cuda=cuda))
        progress = world.status["progress"]
        assert progress["peakMemoryBytes"] == peak
        assert progress["memoryEstimateBytes"] == 58 * GIB
        assert progress.get("deviceMemoryBytes") == (80 * GIB if cuda else None)


def test_a_finished_attempt_shows_the_busiest_ranks_peak_from_its_result() -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step(scraped(world, cuda=True))  # rank 0's 61 GiB
    world.set_state(name, "succeeded", message=train_result())
    world.step()
    assert world.status["progress"]["peakMemoryBytes"] == 61 * GIB  # none in the result: kept

    world = World(run_doc())
    through_data(world)
    world.finish("train", message=result("train", step=100, totalSteps=100, **measured(64)))
    progress = world.status["progress"]
    assert progress["peakMemoryBytes"] == 64 * GIB and progress["deviceMemoryBytes"] == 80 * GIB
    assert progress["memoryEstimateBytes"] == 58 * GIB


def fit_rows() -> list[dict[str, Any]]:
    """The memory model's own rows for a Llama-3.1-8B shape, as the preprocess stage writes
    them: a full fine-tune on one GPU (does not fit) and on eight with ZeRO-3 (fits)."""
    shape = LLAMA_8B
    setups = {
        "sanity-1": dict(world_size=1, zero_stage=0),
        "train": dict(world_size=8, zero_stage=3),
    }
    rows = []
    for stage, changes in setups.items():
        setup = memory.Setup(
            stage=stage,
            where="spec",
            mode="train",
            method="sft",
            adapter="none",
            lora_r=0,
            target_modules=(),
            precision="bf16",
            weight_precision="bf16",
            optimizer="adamw_torch",
            offload=False,
            procs_per_node=8,
            micro_batch_size=4,
            block_size=4096,
            gradient_checkpointing=True,
            attention="sdpa",
            compile=False,
            reference="none",
            gpu=True,
            **changes,  # type: ignore[arg-type]
        )
        rows.append(memory.row(memory.estimate(shape, setup), 80 * GIB))
    return rows


def test_the_preprocess_fit_table_becomes_status_fit() -> None:
    rows = fit_rows()
    world = World(run_doc())
    world.step()
    world.finish("preprocess", message=result("preprocess", **PREPROCESS_RESULT, fit=rows))
    fit = world.status["fit"]  # the World checked it against the CRD's schema
    assert [r["stage"] for r in fit] == ["sanity-1", "train"]
    for row, shown in zip(rows, fit, strict=True):
        assert shown["estimateBytes"] == row["estimateBytes"] > 0
        assert (shown["worldSize"], shown["device"], shown["fits"]) == (
            row["worldSize"],
            "gpu",
            row["fits"],
        )
        assert shown["allocatedBytes"] == row["allocatedBytes"]
        assert shown["hostBytes"] == row["hostBytes"]
        assert [[t["name"], t["bytes"]] for t in shown["largest"]] == row["largest"]
    assert fit[0]["fits"] is False and fit[1]["fits"] is True


def test_status_fit_is_bounded_and_drops_rows_the_schema_would_refuse() -> None:
    good = fit_rows()[1]
    bad = [{**good, "worldSize": 0}, {**good, "device": "tpu"}, "row", {"stage": "x"}]
    world = World(run_doc())
    world.step()
    rows = [*bad, *[good] * (FIT_ROWS + 5)]
    world.finish("preprocess", message=result("preprocess", **PREPROCESS_RESULT, fit=rows))
    assert len(world.status["fit"]) == FIT_ROWS - len(bad)
    # no fit in the result (the plan sized the model itself): no status.fit
    world = World(run_doc())
    through_data(world)
    assert "fit" not in world.status


def test_the_crd_schema_types_the_new_fields() -> None:
    row = {**fit_rows()[0], "largest": [{"name": "weights", "bytes": 1}]}
    rung = {"rung": 1, "passed": True, "peakMemoryBytes": 1, "tokensPerSecond": 2.5}
    assert status_schema_errors({"fit": [row], "sanity": [rung]}) == []
    wrong = [
        {"fit": [{**row, "largest": [["weights", 1]]}]},  # terms are named objects
        {"fit": [{**row, "estimateBytes": -1}]},
        {"fit": [{**row, "surprise": 1}]},
        {"fit": [row] * (FIT_ROWS + 1)},
        {"sanity": [{**rung, "peakMemoryBytes": "77Gi"}]},
        {"progress": {"memoryEstimateBytes": -5}},
    ]
    for status in wrong:
        assert status_schema_errors(status), status
    assert names.TRAIN_MEMORY_PEAK in names.PROGRESS


def test_a_preprocess_fit_refusal_fails_the_run_with_does_not_fit_before_any_gpu() -> None:
    """The preprocess stage sized the model from its config.json and refused (exit 2, the rows in
    its result): the run fails with reason DoesNotFit and the table, and no sanity or training
    job is ever created."""
    rows = fit_rows()
    world = World(run_doc(sanity={"steps": 10}))
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    refusal = "spec.sanity: sanity-1 on 1 process(es) needs about 120.0 GiB per GPU"
    world.set_state(
        name,
        "failed",
        message=result("preprocess", False, error=refusal, fit=rows),
        exit_code=2,
    )
    world.step()
    conditions = {c["type"]: c for c in world.status["conditions"]}
    assert world.status["phase"] == "Failed"
    assert conditions["Stalled"]["reason"] == "DoesNotFit"
    assert refusal in conditions["Stalled"]["message"]
    assert [r["fits"] for r in world.status["fit"]] == [False, True]
    assert not [n for n in world.children if "sanity" in n or "train" in n]


def test_a_model_the_plan_sizes_has_its_fit_table_in_status_from_the_start() -> None:
    spec = {
        "model": {
            "architecture": {"hiddenSize": 64, "layers": 2, "heads": 4, "contextLength": 128}
        },
        "tokenizer": {"train": {"vocabSize": 1024}},
        "method": {"stage": "pretrain"},
        "resources": {"gpusPerNode": 1, "gpuMemory": "24Gi"},
        "training": {"maxSteps": 100, "precision": "bf16"},
        "output": {"uri": "s3://out/scratch"},
    }
    world = World(run_doc(**spec))
    world.step()
    fit = world.status["fit"]
    assert [r["stage"] for r in fit] == ["train", "merge"]
    assert all(r["fits"] is True and r["device"] == "gpu" for r in fit)
