"""`status.derive_status` over tables of child states — pure, nothing emulated.

Real: the TrainingRun model, plan and render (the objects the operator would create). The world
around it is a dictionary of children and pods that the tests change the way the Job controller
and the Kubeflow training operator would (standin/controllers.py); the actions
derive_status returns are applied to that dictionary as the API server would (create-if-absent,
delete).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetrain_contract import metrics
from kubetrain_contract.durations import duration_seconds
from kubetrain_operator import status as st
from kubetrain_operator.api import SanitySpec
from kubetrain_operator.status import (
    DeleteObject,
    EnsureObject,
    Progress,
    RecordEvent,
    RequeueAfter,
    SetSuspend,
)
from operator_support import PREPROCESS_RESULT, result, run_doc, stored
from standin.controllers import condition, job_status, pod_for
from status_world import T0, TIMING, World, sanity_spec, through_data, train_result


# -------------------------------------------------------------------------------- first visit
def test_first_visit_creates_config_service_and_preprocess_job_only() -> None:
    world = World(run_doc())
    actions = world.step()
    created = [a.body["kind"] for a in actions if isinstance(a, EnsureObject)]
    assert created == ["ConfigMap", "Service", "Job"]
    assert world.status["phase"] == st.P_PREPROCESSING
    types = [c["type"] for c in world.status["conditions"]]
    assert types == list(st.CONDITION_TYPES)
    assert all(c["observedGeneration"] == 1 for c in world.status["conditions"])
    assert world.condition(st.READY)["status"] == "False"
    assert world.condition(st.RECONCILING)["status"] == "True"
    assert world.condition(st.SUCCEEDED)["status"] == "Unknown"
    assert world.status["observedGeneration"] == 1


def test_a_repeated_reconcile_changes_nothing_and_records_no_event() -> None:
    world = World(run_doc())
    world.step()
    world.step()
    first = copy.deepcopy(world.status)
    actions = world.step(dt=120)
    assert world.status == first  # lastTransitionTime did not move, nothing new
    assert not [a for a in actions if isinstance(a, RecordEvent)]


def test_last_transition_time_moves_only_on_change_and_each_change_is_an_event() -> None:
    world = World(run_doc())
    world.step()
    before = world.condition(st.DATA_READY)["lastTransitionTime"]
    world.set_state(world.child("preprocess")["metadata"]["name"], "running")
    world.step(dt=30)
    assert world.condition(st.DATA_READY)["lastTransitionTime"] == before
    world.events.clear()
    world.set_state(
        world.child("preprocess")["metadata"]["name"],
        "succeeded",
        message=result("preprocess", **PREPROCESS_RESULT),
    )
    world.step(dt=30)
    assert world.condition(st.DATA_READY)["lastTransitionTime"] != before
    assert any(e.reason == st.R_CACHE_MISS for e in world.events)


def test_invalid_spec_is_reported_with_the_messages_and_creates_nothing() -> None:
    doc = run_doc(method={"stage": "dpo"})  # dpo needs preference data
    world = World(doc)
    actions = world.step()
    assert not [a for a in actions if isinstance(a, EnsureObject)]
    ready = world.condition(st.READY)
    assert (ready["status"], ready["reason"]) == ("False", st.R_INVALID_SPEC)
    assert "data.format" in ready["message"]
    assert world.condition(st.STALLED)["status"] == "True"
    warnings = [e for e in world.events if e.type == "Warning"]
    assert warnings and warnings[0].reason == st.R_INVALID_SPEC


# ----------------------------------------------------------------------------------- stages
@pytest.mark.parametrize(("hit", "reason"), [(False, st.R_CACHE_MISS), (True, st.R_CACHE_HIT)])
def test_preprocess_result_fills_status_dataset(hit: bool, reason: str) -> None:
    world = World(run_doc())
    through_data(world, hit=hit)
    ready = world.condition(st.DATA_READY)
    assert (ready["status"], ready["reason"]) == ("True", reason)
    dataset = world.status["dataset"]
    assert dataset["cacheKey"] == PREPROCESS_RESULT["key"]
    assert dataset["cacheHit"] is hit
    assert dataset["trainTokens"] == PREPROCESS_RESULT["trainTokens"]
    assert dataset["rejectedRows"] == {"emptyText": 12}
    # next: the training attempt
    assert world.child("train")["metadata"]["name"].endswith("-train-1")
    assert world.status["attempts"] == 1


@pytest.mark.parametrize(
    ("state", "phase", "reason"),
    [
        ("running", st.P_PREPROCESSING, st.R_PREPROCESSING),
        ("suspended", st.P_PREPROCESSING, st.R_PREPROCESSING),
    ],
)
def test_job_conditions_while_not_finished(state: str, phase: str, reason: str) -> None:
    world = World(run_doc())
    world.step()
    world.set_state(world.child("preprocess")["metadata"]["name"], state)
    world.step()
    assert world.status["phase"] == phase
    assert world.condition(st.READY)["reason"] == reason
    assert world.condition(st.DATA_READY)["status"] == "False"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (2, st.R_INVALID_INPUT),
        (3, st.R_UNHEALTHY),
        (1, st.R_STAGE_FAILED),
        (137, st.R_STAGE_FAILED),
    ],
)
def test_a_failed_preprocess_job_ends_the_run_with_its_own_message(code: int, reason: str) -> None:
    world = World(run_doc())
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    error = "12 of 100 rows rejected (12.00%), above maxRejectedFraction 1.00%"
    world.set_state(
        name, "failed", exit_code=code, message=result("preprocess", False, error=error)
    )
    world.step()
    ready, stalled = world.condition(st.READY), world.condition(st.STALLED)
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert (stalled["status"], stalled["reason"]) == ("True", reason)
    assert error in stalled["message"] and f"exit code {code}" in stalled["message"]
    assert world.condition(st.DATA_READY)["status"] == "False"
    assert world.condition(st.SUCCEEDED)["status"] == "False"
    assert world.status["phase"] == st.P_FAILED
    assert not [c for c in world.children if "-train-" in c]


def test_a_preprocess_job_past_its_deadline_fails_the_run_naming_stage_deadline() -> None:
    """A stage that never ends (issue 16): the Job controller stops it at activeDeadlineSeconds
    (SIGTERM, exit 143, no result) and marks it Failed, reason DeadlineExceeded."""
    world = World(run_doc())
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    assert world.child("preprocess")["spec"]["activeDeadlineSeconds"] == 24 * 3600
    world.set_state(name, "running")
    world.step()
    world.now += 24 * 3600
    world.set_state(name, "failed", exit_code=143)
    (failed,) = [c for c in world.children[name]["status"]["conditions"] if c["type"] == "Failed"]
    failed.update(
        reason="DeadlineExceeded", message="Job was active longer than specified deadline"
    )
    world.step()
    stalled = world.condition(st.STALLED)
    assert (stalled["status"], stalled["reason"]) == ("True", st.R_DEADLINE_EXCEEDED)
    assert "stageDeadline 24h" in stalled["message"] and name in stalled["message"]
    assert world.condition(st.DATA_READY)["reason"] == st.R_DEADLINE_EXCEEDED
    assert world.status["phase"] == st.P_FAILED
    assert not [c for c in world.children if "-train-" in c]


@pytest.mark.parametrize(
    ("state", "phase", "ready_reason"),
    [
        ("pending", st.P_TRAINING, st.R_STARTING),
        ("running", st.P_TRAINING, st.R_TRAINING),
        ("suspended", st.P_TRAINING, st.R_TRAINING),
    ],
)
def test_pytorchjob_conditions_while_not_finished(
    state: str, phase: str, ready_reason: str
) -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    if state != "pending":
        world.set_state(name, state)
    else:
        world.children[name]["status"] = {
            "conditions": [job_status("PyTorchJob", "running", world.now)["conditions"][0]]
        }
    world.step()
    assert world.status["phase"] == phase
    assert world.condition(st.READY)["reason"] == ready_reason
    assert world.condition(st.RECONCILING)["status"] == "True"


def test_happy_path_ends_succeeded_with_outputs_and_progress() -> None:
    world = World(run_doc())
    through_data(world)
    world.finish("train", message=train_result())
    assert world.status["phase"] == st.P_MERGING
    merged = result(
        "merge",
        perplexity=3.2,
        outputs={"final": "s3://out/sft/final", "merged": "s3://out/sft/merged"},
    )
    world.finish("merge", message=merged)
    assert world.status["phase"] == st.P_SUCCEEDED
    for type_, status in (
        (st.READY, "True"),
        (st.SUCCEEDED, "True"),
        (st.STALLED, "False"),
        (st.RECONCILING, "False"),
        (st.DATA_READY, "True"),
    ):
        assert world.condition(type_)["status"] == status, type_
    assert world.status["outputs"] == {
        "adapter": "s3://out/sft/final",
        "model": "s3://out/sft/merged",
    }
    assert world.status["checkpoint"]["step"] == 100
    assert world.status["progress"]["step"] == 100
    assert world.status["evaluation"]["perplexity"] == 3.2
    # done is done: nothing more is created
    assert not [a for a in world.step(dt=3600) if isinstance(a, EnsureObject)]


def test_a_push_puts_the_hub_commit_in_outputs() -> None:
    doc = run_doc(
        output={"uri": "s3://out/sft", "merge": True, "push": {"hub": "org/tuned"}},
        storage={"s3": {"secretName": "s3-credentials"}, "hf": {"secretName": "hub-token"}},
    )
    world = World(doc)
    through_data(world)
    world.finish("train", message=train_result())
    commit = "0123456789abcdef0123456789abcdef01234567"
    merged = result(
        "merge",
        outputs={"final": "s3://out/sft/final", "merged": "s3://out/sft/merged"},
        hubRepo="org/tuned",
        hubCommit=commit,
    )
    world.finish("merge", message=merged)
    assert world.status["phase"] == st.P_SUCCEEDED
    assert world.status["outputs"] == {
        "adapter": "s3://out/sft/final",
        "model": "s3://out/sft/merged",
        "hubRepo": "org/tuned",
        "hubCommit": commit,
    }


def test_outputs_on_a_claim_are_reported_as_pvc_uris_a_chained_run_accepts() -> None:
    """Stages report paths as the pod sees them (/mnt/pvc/CLAIM/…); status speaks the user's
    URIs, and the chained run plans from them (an in-pod path is refused as a local path)."""
    world = World(run_doc(output={"uri": "pvc://data/runs/sft", "merge": True}))
    through_data(world)
    world.finish(
        "train",
        message=result(
            "train",
            step=100,
            totalSteps=100,
            checkpoint={"step": 100, "uri": "/mnt/pvc/data/runs/sft/checkpoints/step-00000100"},
            outputs={"final": "/mnt/pvc/data/runs/sft/final"},
        ),
    )
    world.finish(
        "merge", message=result("merge", outputs={"merged": "/mnt/pvc/data/runs/sft/merged"})
    )
    assert world.status["outputs"] == {
        "adapter": "pvc://data/runs/sft/final",
        "model": "pvc://data/runs/sft/merged",
    }
    assert world.status["checkpoint"]["uri"] == "pvc://data/runs/sft/checkpoints/step-00000100"
    chained = World(dpo_doc(), upstream=world.run)
    config = next(
        a.body
        for a in chained.step()
        if isinstance(a, EnsureObject) and a.body["kind"] == "ConfigMap"
    )
    assert json.loads(config["data"]["train.json"])["model"]["uri"] == (
        "/mnt/pvc/data/runs/sft/merged"
    )


# ------------------------------------------------------------------------- exit codes, retries
@pytest.mark.parametrize(
    ("code", "retry", "reason"),
    [
        (2, False, st.R_INVALID_INPUT),
        (3, False, st.R_UNHEALTHY),
        (143, True, st.R_BACKING_OFF),
        (1, True, st.R_BACKING_OFF),
        (137, True, st.R_BACKING_OFF),
    ],
)
def test_training_exit_codes_follow_the_stage_contract(code: int, retry: bool, reason: str) -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    message = "loss is NaN at step 12: lower the learning rate"
    world.set_state(name, "failed", exit_code=code, message=result("train", False, error=message))
    actions = world.step()
    ready = world.condition(st.READY)
    assert ready["reason"] == reason
    if retry:
        assert world.status["phase"] == st.P_TRAINING
        assert [a for a in actions if isinstance(a, RequeueAfter)]
        assert world.condition(st.STALLED)["status"] == "False"
    else:
        assert world.condition(st.STALLED)["status"] == "True"
        assert message in world.condition(st.STALLED)["message"]
        assert world.status["phase"] == st.P_FAILED
        world.step(dt=3600)
        assert [c for c in world.children if "-train-" in c] == [name]
    history = world.status["attemptHistory"]
    assert history[0]["exitCode"] == code and history[0]["result"] == "Failed"


def test_the_decisive_pod_is_the_one_that_failed_on_its_own() -> None:
    doc = run_doc(resources={"nodes": 3, "gpusPerNode": 0})
    world = World(doc)
    through_data(world)
    job = world.child("train")
    name = job["metadata"]["name"]
    job["status"] = job_status("PyTorchJob", "failed", world.now)
    world.pods = {
        "m": pod_for(job, exit_code=143, at=world.now + 5),
        "w0": pod_for(
            job,
            replica="worker",
            index=0,
            exit_code=1,
            at=world.now + 1,
            message="NCCL timeout on rank 1",
        ),
        "w1": pod_for(job, replica="worker", index=1, exit_code=143, at=world.now + 2),
    }
    world.step()
    first = world.status["attemptHistory"][0]
    assert (
        first["exitCode"] == 1 and "NCCL timeout" in first["message"] and name in first["message"]
    )


def test_backoff_doubles_and_no_attempt_starts_while_old_pods_run() -> None:
    world = World(run_doc(maxRestarts=3))
    through_data(world)
    for attempt, wait in ((1, 10.0), (2, 20.0), (3, 40.0)):
        name = world.child("train")["metadata"]["name"]
        assert name.endswith(f"-train-{attempt}")
        world.set_state(name, "running")
        world.step()
        world.set_state(name, "failed", exit_code=1)
        # one pod of the failed attempt is still running: the job is deleted, nothing starts
        world.pods["straggler"] = pod_for(world.children[name], index=1, at=world.now)
        actions = world.step(dt=0.0)
        assert [a for a in actions if isinstance(a, DeleteObject) and a.name == name]
        assert not [a for a in actions if isinstance(a, EnsureObject)]
        assert world.condition(st.READY)["reason"] == st.R_RESTARTING
        del world.pods["straggler"]
        requeue = [a.seconds for a in world.step(dt=0.0) if isinstance(a, RequeueAfter)]
        assert requeue == [pytest.approx(wait)]
        assert world.status["attempts"] == attempt
        world.step(dt=wait)
        assert world.status["attempts"] == attempt + 1
    world.finish("train", message=train_result())
    assert world.status["phase"] == st.P_MERGING
    assert [a["reason"] for a in world.status["attemptHistory"]] == [
        "initial",
        "failure",
        "failure",
        "failure",
    ]


def test_backoff_waits_before_the_next_attempt() -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    world.set_state(name, "failed", exit_code=1)
    actions = world.step(dt=0.0)
    waits = [a.seconds for a in actions if isinstance(a, RequeueAfter)]
    assert waits == [pytest.approx(TIMING.backoff_base)]
    world.step(dt=TIMING.backoff_base / 2)
    assert world.status["attempts"] == 1
    world.step(dt=TIMING.backoff_base)
    assert world.status["attempts"] == 2
    assert world.child("train")["metadata"]["name"].endswith("-train-2")


def test_restarts_exhausted_stalls_with_the_trainers_message() -> None:
    world = World(run_doc(maxRestarts=1))
    through_data(world)
    for _ in range(2):
        name = world.child("train")["metadata"]["name"]
        world.set_state(name, "running")
        world.step()
        world.set_state(
            name,
            "failed",
            exit_code=1,
            message=result("train", False, error="CUDA error: device lost"),
        )
        world.step(dt=100)
        world.step(dt=100)
        if name.endswith("-1"):
            world.children.pop(name)  # (any old attempt may be gone)
    stalled = world.condition(st.STALLED)
    assert (stalled["status"], stalled["reason"]) == ("True", st.R_RESTARTS_EXHAUSTED)
    assert "CUDA error: device lost" in stalled["message"]
    assert world.condition(st.READY)["status"] == "False"
    assert world.status["attempts"] == 2


# ------------------------------------------------------------------------------------ stalls
def progress(last_step: float, step: int = 10, at: float | None = None) -> Progress:
    return Progress(
        {
            metrics.TRAIN_STEP: step,
            metrics.TRAIN_TOTAL_STEPS: 100,
            metrics.TRAIN_LOSS: 2.5,
            metrics.TRAIN_LAST_STEP_TIMESTAMP: last_step,
            metrics.TRAIN_ETA: 3725.0,
            metrics.TRAIN_TOKENS_PER_SECOND: 2140.0,
        },
        at if at is not None else last_step,
    )


def test_progress_fills_status_and_the_ready_message() -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step(progress(world.now))
    shown = world.status["progress"]
    assert shown["step"] == 10 and shown["totalSteps"] == 100 and shown["loss"] == 2.5
    assert shown["eta"] == "1h02m" and shown["tokensPerSecond"] == 2140.0
    assert "lastStepTime" in shown
    assert world.condition(st.READY)["message"].startswith("step 10/100")
    world.step(
        Progress({**progress(world.now).samples, metrics.CHECKPOINT_LAST_STEP: 500.0}, world.now)
    )
    assert world.status["checkpoint"] == {
        "step": 500,
        "uri": "s3://out/sft/checkpoints/step-00000500",
    }


def test_a_stall_deletes_the_attempt_and_starts_the_next_after_its_pods_are_gone() -> None:
    world = World(run_doc())  # stallTimeout 1m
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    beat = world.now
    world.step(progress(beat), dt=30)
    assert not [a for a in world.actions if isinstance(a, DeleteObject)]
    actions = world.step(progress(beat, at=world.now + 40), dt=40)  # 70 s without a step
    deletes = [a for a in actions if isinstance(a, DeleteObject)]
    assert deletes and deletes[0].name == name and deletes[0].why == "stalled"
    assert world.status["attemptHistory"][0]["result"] == "Stalled"
    assert any(e.type == "Warning" or e.reason == "AttemptStarted" for e in world.events)
    # the pod is still terminating: no new attempt yet
    assert world.status["attempts"] == 1
    world.pods.pop(name)
    world.step()
    assert world.status["attempts"] == 2
    assert world.status["attemptHistory"][1]["reason"] == "stall"


def test_stale_progress_from_before_the_attempt_does_not_hide_a_fresh_start() -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step(progress(world.now - 3600))  # a scrape from an earlier attempt / clock
    assert not [a for a in world.actions if isinstance(a, DeleteObject)]  # running since now
    world.step(progress(world.now - 3600), dt=61)
    assert [a for a in world.actions if isinstance(a, DeleteObject)]


def test_steady_progress_is_never_a_stall() -> None:
    world = World(run_doc())
    through_data(world)
    world.set_state(world.child("train")["metadata"]["name"], "running")
    for _ in range(10):
        world.step(progress(world.now + 30), dt=30)
    assert world.status["attempts"] == 1
    assert not [a for a in world.actions if isinstance(a, DeleteObject)]


# ------------------------------------------------------------------------------------ suspend
def test_suspend_and_resume_the_running_training() -> None:
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    world.run["spec"]["suspend"] = True
    world.run["metadata"]["generation"] = 2
    actions = world.step()
    assert [a for a in actions if isinstance(a, SetSuspend) and a.suspend and a.name == name]
    world.set_state(name, "suspended")
    world.step(dt=3600)  # suspended is not a stall
    assert world.status["phase"] == st.P_SUSPENDED
    assert world.condition(st.READY)["reason"] == st.R_SUSPENDED
    assert world.condition(st.RECONCILING)["status"] == "False"
    assert all(c["observedGeneration"] == 2 for c in world.status["conditions"])
    world.run["spec"]["suspend"] = False
    world.run["metadata"]["generation"] = 3
    actions = world.step()
    assert [a for a in actions if isinstance(a, SetSuspend) and not a.suspend]
    world.set_state(name, "running")
    world.step()
    assert world.status["phase"] == st.P_TRAINING
    assert world.status["attempts"] == 1  # the same attempt continues from its checkpoint


def test_with_a_kueue_queue_the_operator_leaves_suspend_alone() -> None:
    world = World(run_doc(queueName="gpu-team"))
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "suspended")  # Kueue holds it until admitted
    actions = world.step()
    assert not [a for a in actions if isinstance(a, SetSuspend)]
    assert world.condition(st.READY)["reason"] == st.R_QUEUED


def test_a_suspended_run_starts_no_new_stage() -> None:
    world = World(run_doc(suspend=True))
    actions = world.step()
    assert not [a for a in actions if isinstance(a, EnsureObject)]
    assert world.status["phase"] == st.P_SUSPENDED


# ----------------------------------------------------------------------------------- chaining
def upstream_run(
    succeeded: str | None, model: str | None = "s3://out/sft/merged"
) -> dict[str, Any]:
    parent = stored(run_doc("sft"))
    if succeeded is not None:
        parent["status"] = {
            "phase": "Succeeded" if succeeded == "True" else "Failed",
            "conditions": [
                {"type": "Succeeded", "status": succeeded, "reason": "X", "message": "exit code 3"}
            ],
            "outputs": {"model": model} if model else {},
        }
    return parent


def dpo_doc() -> dict[str, Any]:
    return run_doc(
        "dpo",
        model={"fromRun": "sft"},
        data={"format": "preference", "train": ["s3://data/prefs.jsonl"], "blockSize": 128},
        method={"stage": "dpo", "adapter": {"type": "lora"}},
    )


def preprocess_beat(at: float, scraped: float) -> Progress:
    """A scrape of the preprocess stage's heartbeat (what reconcile reads while its pod runs)."""
    return Progress({metrics.PREPROCESS_LAST_PROGRESS_TIMESTAMP: at}, scraped)


def test_a_preprocess_job_making_progress_is_left_alone() -> None:
    world = World(run_doc())  # stallTimeout 1m
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    world.set_state(name, "running")
    for _ in range(5):  # 150 s running, a chunk read every 30 s
        actions = world.step(preprocess_beat(world.now + 30, world.now + 30), dt=30)
        assert not [a for a in actions if isinstance(a, DeleteObject)]
    assert name in world.children and world.status["phase"] == st.P_PREPROCESSING
    assert "progress" not in world.status  # training's field: not filled from preprocess


def test_a_preprocess_job_without_progress_for_stall_timeout_is_deleted_and_fails_the_run() -> None:
    """A hung read or a stuck worker (issue 16): the heartbeat stops; past stallTimeout the Job
    is deleted (its pods stop) and the run fails — for good, not recreated once it is gone."""
    world = World(run_doc())  # stallTimeout 1m
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    world.set_state(name, "running")
    beat = world.now + 5
    world.step(preprocess_beat(beat, beat), dt=30)
    assert not [a for a in world.actions if isinstance(a, DeleteObject)]
    actions = world.step(preprocess_beat(beat, world.now + 45), dt=45)  # 70 s since the beat
    deletes = [a for a in actions if isinstance(a, DeleteObject)]
    assert [(d.name, d.why) for d in deletes] == [(name, "stalled")]
    stalled = world.condition(st.STALLED)
    assert (stalled["status"], stalled["reason"]) == ("True", st.R_PROGRESS_STALLED)
    assert stalled["message"].startswith(f"{name}: no preprocessing progress for 1m10s")
    assert "stallTimeout 1m" in stalled["message"]
    assert world.condition(st.DATA_READY)["reason"] == st.R_PROGRESS_STALLED
    assert world.status["phase"] == st.P_FAILED and "progress" not in world.status
    world.step(dt=5)  # its pod is still stopping: the run stays failed
    assert world.status["phase"] == st.P_FAILED
    world.pods.pop(name)  # its pod has stopped: the Job is not created again
    world.step(dt=600)
    assert name not in world.children and world.status["phase"] == st.P_FAILED
    world.run["spec"]["stallTimeout"] = "2h"  # a changed spec runs the stage again
    world.run["metadata"]["generation"] = 2
    world.step()
    assert name in world.children and world.status["phase"] == st.P_PREPROCESSING


@pytest.mark.parametrize(
    ("parent", "reason", "stalled"),
    [
        (None, st.R_WAITING_FOR_UPSTREAM, "False"),
        (upstream_run(None), st.R_WAITING_FOR_UPSTREAM, "False"),
        (upstream_run("False"), st.R_UPSTREAM_FAILED, "True"),
    ],
)
def test_a_chained_run_waits_for_its_parent(
    parent: dict[str, Any] | None, reason: str, stalled: str
) -> None:
    world = World(dpo_doc(), upstream=parent)
    actions = world.step()
    assert not [a for a in actions if isinstance(a, EnsureObject)]
    assert world.condition(st.READY)["reason"] == reason
    assert world.condition(st.STALLED)["status"] == stalled


def test_a_chained_run_starts_from_its_parents_output_model() -> None:
    world = World(dpo_doc(), upstream=upstream_run("True"))
    actions = world.step()
    config = next(
        a.body for a in actions if isinstance(a, EnsureObject) and a.body["kind"] == "ConfigMap"
    )
    train = json.loads(config["data"]["train.json"])
    assert train["model"]["uri"] == "s3://out/sft/merged"
    assert world.status["upstream"] == {"run": "sft", "model": "s3://out/sft/merged"}


# ------------------------------------------------------------------------------- sanity ladder
def gate(loss: tuple[float, float]) -> dict[str, Any]:
    first, last = loss
    return {
        "firstLoss": first,
        "lastLoss": last,
        "lossDrop": (first - last) / first,
        "maxGradNorm": 3.0,
        "steps": 10,
    }


def rung_count() -> int:
    return 2 if "rungs" in SanitySpec.model_fields else 1


def test_ladder_rungs_pass_in_order_then_training_starts() -> None:
    rungs = rung_count()
    world = World(run_doc(sanity=sanity_spec(rungs)))
    through_data(world)
    for index in range(1, rungs + 1):
        assert not [c for c in world.children if "-train-" in c]
        running = [
            c
            for c in world.children
            if "sanity" in c and c not in {r["metadata"]["name"] for r in []}
        ]
        assert running
        name = sorted(n for n in world.children if "sanity" in n)[index - 1]
        world.set_state(name, "running")
        world.step()
        assert world.condition(st.SANITY_PASSED)["reason"] == st.R_SANITY_RUNNING
        world.set_state(name, "succeeded", message=result("sanity", sanity=gate((2.45, 2.12))))
        world.step()
    passed = world.condition(st.SANITY_PASSED)
    assert (passed["status"], passed["reason"]) == ("True", st.R_LOSS_DROPPED)
    assert passed["message"] == f"rung {rungs}/{rungs}: loss 2.45 → 2.12 in 10 steps"
    assert [r["passed"] for r in world.status["sanity"]] == [True] * rungs
    assert world.child("train")["metadata"]["name"].endswith("-train-1")


def test_a_failing_rung_stops_the_ladder_before_training() -> None:
    world = World(run_doc(sanity=sanity_spec(rung_count())))
    through_data(world)
    name = sorted(n for n in world.children if "sanity" in n)[0]
    world.set_state(name, "running")
    world.step()
    error = "sanity gate failed: loss 2.4500 → 2.4400 in 10 steps is a 0.4% drop"
    world.set_state(
        name,
        "failed",
        exit_code=3,
        message=result("sanity", False, error=error, sanity=gate((2.45, 2.44))),
    )
    world.step()
    passed = world.condition(st.SANITY_PASSED)
    assert (passed["status"], passed["reason"]) == ("False", st.R_SANITY_FAILED)
    assert error in passed["message"]
    assert world.condition(st.STALLED)["status"] == "True"
    assert world.status["sanity"][0]["passed"] is False
    world.step(dt=3600)
    assert not [c for c in world.children if "-train-" in c]


# ---------------------------------------------------------------------------------- secrets
def test_credentials_in_a_termination_message_never_reach_status_or_events() -> None:
    world = World(run_doc())
    world.step()
    name = world.child("preprocess")["metadata"]["name"]
    leaked = (
        "open s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/x "
        "failed; https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef00&x=1 "
        "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz123456 aws_secret_access_key=wJalrXUtnFEMIK7"
    )
    world.set_state(name, "failed", exit_code=1, message=result("preprocess", False, error=leaked))
    world.step()
    text = json.dumps(world.status) + json.dumps([e.message for e in world.events])
    for secret in (
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI",
        "deadbeef00",
        "hf_abcdefghijklmnopqrstuvwxyz123456",
    ):
        assert secret not in text
    assert "[REDACTED]" in text


def test_time_helpers() -> None:
    assert duration_seconds("1h30m") == 5400 and duration_seconds("90s") == 90
    assert TIMING.backoff(1) == 10 and TIMING.backoff(3) == 40 and TIMING.backoff(9) == 40


def test_a_finished_child_waits_briefly_for_its_pods_exit_codes() -> None:
    """The child's Failed condition can arrive before its pod's terminated state (two watches)."""
    world = World(run_doc())
    through_data(world)
    name = world.child("train")["metadata"]["name"]
    world.set_state(name, "running")
    world.step()
    world.children[name]["status"] = job_status("PyTorchJob", "failed", world.now)
    world.step()  # the pod still says running
    assert "result" not in world.status["attemptHistory"][0]
    world.set_state(name, "failed", exit_code=3, message=result("train", False, error="NaN"))
    world.step()
    assert world.status["attemptHistory"][0]["exitCode"] == 3
    # a pod that never reports: after the grace the child's own word is taken
    other = World(run_doc())
    through_data(other)
    name = other.child("train")["metadata"]["name"]
    other.set_state(name, "running")
    other.step()
    other.children[name]["status"] = job_status("PyTorchJob", "failed", other.now)
    other.step(dt=st.POD_REPORT_GRACE + 1)
    assert other.status["attemptHistory"][0]["result"] == "Failed"


@pytest.mark.parametrize(
    ("kind", "conditions", "active", "phase"),
    [
        ("Job", [], 0, "pending"),
        ("Job", [], 1, "running"),
        ("Job", ["FailureTarget"], 1, "running"),  # Failed follows once pods are gone
        ("Job", ["SuccessCriteriaMet"], 1, "running"),  # Complete follows
        ("Job", ["Complete"], 0, "succeeded"),
        ("Job", ["Failed"], 0, "failed"),
        ("Job", ["Suspended"], 0, "suspended"),
        ("PyTorchJob", ["Created"], 0, "pending"),
        ("PyTorchJob", ["Created", "Running"], 0, "running"),
        ("PyTorchJob", ["Created", "Restarting"], 0, "running"),
        ("PyTorchJob", ["Created", "Succeeded"], 0, "succeeded"),
        ("PyTorchJob", ["Created", "Failed"], 0, "failed"),
        ("PyTorchJob", ["Created", "Suspended"], 0, "suspended"),
    ],
)
def test_every_job_and_pytorchjob_condition(
    kind: str, conditions: list[str], active: int, phase: str
) -> None:
    body = {
        "apiVersion": "batch/v1" if kind == "Job" else "kubeflow.org/v1",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": {},
        "status": {"conditions": [condition(c, T0, kind=kind) for c in conditions]},
    }
    if active:
        body["status"]["active"] = active
    assert st.observe_child("x", body, []).phase == phase


def test_an_invalid_spec_that_is_fixed_starts_the_run() -> None:
    world = World(run_doc(method={"stage": "dpo"}))
    world.step()
    assert world.condition(st.READY)["reason"] == st.R_INVALID_SPEC
    world.run["spec"]["method"] = {"stage": "sft", "adapter": {"type": "lora"}}
    world.run["metadata"]["generation"] = 2
    world.step()
    assert world.condition(st.STALLED)["status"] == "False"
    assert world.child("preprocess")
    assert world.condition(st.READY)["observedGeneration"] == 2
