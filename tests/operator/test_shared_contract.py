"""kubetrain_contract is what both sides use: the trainer writes, the operator reads.

Real: the trainer's metric registries (prometheus_client) and their text exposition, the
operator's scrape parser (`progress.parse_samples`), `derive_status` over a run's world, the
operator's plan on every example, the lifecycle's role table, the CRD rules, the trainer's stage
failures and the CLI's exit-code mapping. Emulated: the run's children and pods (a dictionary,
tests/support/status_world.py), as in test_status.py. Nothing of the project is mocked.
"""

from __future__ import annotations

import typing

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kubetrain_contract import exit_codes, layout, metrics
from kubetrain_contract.credentials import SECRET_QUERY_WORDS, is_secret_query_name
from kubetrain_contract.durations import format_duration
from kubetrain_contract.methods import METHOD_FORMATS, DataFormat, Method
from kubetrain_operator import api
from kubetrain_operator import exit_codes as cli_codes
from kubetrain_operator.plan import STAGE_ROLES
from kubetrain_operator.progress import parse_samples
from kubetrain_operator.status import Progress, lifecycle
from kubetrain_trainer import config as trainer_config
from kubetrain_trainer.metrics import PreprocessMetrics, TrainerMetrics
from kubetrain_trainer.stage import InvalidInput, Retryable, Unhealthy
from operator_support import run_doc
from runspecs import all_documents, planned, rendered
from status_world import World, through_data


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """The series names a scrape shows: counters with `_total`, everything else as registered."""
    return {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }


# ------------------------------------------------------------------------------------ metrics
def test_the_trainer_registers_exactly_the_contract_series() -> None:
    registered = exposed_names(PreprocessMetrics("r").registry)
    registered |= exposed_names(TrainerMetrics("r").registry)
    assert registered == set(metrics.ALL)


def test_the_operator_reads_only_contract_series_and_all_of_its_progress_ones() -> None:
    """What the trainer exposes, parsed by the operator's scrape, lands in status.progress."""
    trainer = TrainerMetrics("r")
    trainer.step.labels(run="r").set(10)
    trainer.total_steps.labels(run="r").set(100)
    trainer.loss.labels(run="r").set(2.5)
    trainer.tokens_per_second.labels(run="r").set(2140.0)
    trainer.eta.labels(run="r").set(42.7)
    trainer.checkpoint_last_step.labels(run="r").set(5)
    trainer.eval_loss.labels(run="r").set(9.9)  # exposed, not a progress series: left out
    for kind, value in zip(metrics.MEMORY_PEAK_KINDS, (3.0, 4.0, 5.0), strict=True):
        trainer.memory_peak.labels(run="r", kind=kind).set(value)
    trainer.memory_estimate.labels(run="r").set(6.0)
    trainer.device_memory.labels(run="r").set(80.0)
    samples = parse_samples(generate_latest(trainer.registry).decode())
    assert set(metrics.PROGRESS) <= set(metrics.ALL)
    # the memory peak's kinds are one series each: keyed by memory_peak_key
    peak_keys = {metrics.memory_peak_key(kind) for kind in metrics.MEMORY_PEAK_KINDS}
    assert set(samples) <= set(metrics.PROGRESS) - {metrics.TRAIN_MEMORY_PEAK} | peak_keys
    assert {samples[key] for key in peak_keys} == {3.0, 4.0, 5.0}
    assert metrics.EVAL_LOSS not in samples and samples[metrics.TRAIN_STEP] == 10

    world = World(run_doc())
    through_data(world)
    world.set_state(world.child("train")["metadata"]["name"], "running")
    world.step(Progress(samples, world.now))
    shown = world.status["progress"]
    assert (shown["step"], shown["totalSteps"], shown["loss"]) == (10, 100, 2.5)
    assert shown["tokensPerSecond"] == 2140.0
    assert (shown["peakMemoryBytes"], shown["memoryEstimateBytes"]) == (3, 6)  # allocated
    assert shown["deviceMemoryBytes"] == 80
    assert world.status["checkpoint"]["uri"].endswith(f"/{layout.checkpoint_path(5)}")


# ---------------------------------------------------------------------------------- durations
@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (42.7, "43s"),
        (42.2, "42s"),
        (-3, "0s"),
        (307, "5m07s"),
        (3599.6, "1h00m"),
        (50520, "14h02m"),
    ],
)
def test_one_duration_formatter_rounds_to_the_nearest_second(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_kubetrain_run_and_the_trainers_progress_lines_use_the_contract_formatter() -> None:
    """No second formatter: `kubetrain run`'s bars and the trainer's step lines show the same."""
    from kubetrain_operator import local
    from kubetrain_trainer import callbacks

    assert local.format_duration is callbacks.format_duration is format_duration


def test_the_operators_eta_column_is_the_contract_formatter() -> None:
    """42.7 s: `kubectl get` (status.progress.eta) shows what the contract formatter shows."""
    world = World(run_doc())
    through_data(world)
    world.set_state(world.child("train")["metadata"]["name"], "running")
    world.step(Progress({metrics.TRAIN_ETA: 42.7, metrics.TRAIN_STEP: 1.0}, world.now))
    assert world.status["progress"]["eta"] == format_duration(42.7) == "43s"


# -------------------------------------------------------------------------------- exit codes
def test_stage_failures_exit_with_the_contract_codes() -> None:
    assert InvalidInput("x").exit_code == exit_codes.EXIT_INVALID
    assert Unhealthy("x").exit_code == exit_codes.EXIT_UNHEALTHY
    assert Retryable("x").exit_code == exit_codes.EXIT_RETRY
    assert exit_codes.NON_RETRYABLE == (exit_codes.EXIT_INVALID, exit_codes.EXIT_UNHEALTHY)


def test_the_cli_maps_from_the_contract_codes() -> None:
    assert cli_codes.from_stage(exit_codes.EXIT_OK) == cli_codes.OK
    assert cli_codes.from_stage(exit_codes.EXIT_INVALID) == cli_codes.INVALID
    assert cli_codes.from_stage(exit_codes.EXIT_UNHEALTHY) == cli_codes.UNHEALTHY
    assert cli_codes.from_stage(exit_codes.EXIT_TERMINATED) == cli_codes.TERMINATED
    assert cli_codes.from_stage(exit_codes.EXIT_RETRY) == cli_codes.FAILED


# ------------------------------------------------------------------------- methods, layout
def test_both_sides_accept_the_contract_methods_and_formats() -> None:
    assert set(METHOD_FORMATS) == set(typing.get_args(Method))
    assert {f for fs in METHOD_FORMATS.values() for f in fs} == set(typing.get_args(DataFormat))
    for model, field in (
        (api.MethodSpec, "stage"),
        (trainer_config.TrainConfig, "method"),
        (trainer_config.MergeConfig, "method"),
    ):
        assert model.model_fields[field].annotation == Method
    for model in (api.DataSpec, trainer_config.PreprocessConfig):
        assert model.model_fields["format"].annotation == DataFormat


def test_training_pods_get_the_attempt_under_the_contract_name() -> None:
    jobs = [o for o in rendered(run_doc()) if o["kind"] == "PyTorchJob"]
    assert jobs
    for job in jobs:
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            env = replica["template"]["spec"]["containers"][0]["env"]
            assert layout.ATTEMPT_ENV in {e["name"] for e in env}


@pytest.mark.parametrize("word", SECRET_QUERY_WORDS)
def test_the_operator_refuses_every_credential_word_in_a_uri(word: str) -> None:
    doc = run_doc()
    doc["spec"]["data"]["train"] = [f"s3://bucket/data.jsonl?X-{word.upper()}-part=abc"]
    assert is_secret_query_name(f"X-{word.upper()}-part")
    with pytest.raises(api.InvalidRun, match="credential"):
        api.parse_run(doc)


# ---------------------------------------------------------------------------------- roles
def test_every_planned_stage_has_a_role_and_the_lifecycle_handles_every_role() -> None:
    assert set(lifecycle.ROLES) == set(STAGE_ROLES)
    for doc_id, doc in all_documents().items():
        _, plan = planned(doc)
        roles = [s.role for s in plan.stages]
        assert set(roles) <= set(STAGE_ROLES), doc_id
        assert roles[0] == "preprocess" and roles[-2:] == ["train", "merge"], doc_id
        assert all(role == "sanity" for role in roles[1:-2]), doc_id
        assert all((s.role == "sanity") == (s.rung is not None) for s in plan.stages), doc_id
