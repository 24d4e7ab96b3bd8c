"""The operator's wiring: the real Kopf reactor over real HTTP, with the controllers moved by the
test. What the pure status tests (tests/operator/test_status.py) and the stand-in lifecycle
(tests/end_to_end/test_standin_lifecycle.py) cannot see is what this module keeps: events and
how fast a child's change reaches the run, the progress scrape, what the operator creates over
the API against `render`, a spec change reaching the ConfigMap while an attempt runs, the
operator's own metrics and logs, and the RBAC list, for which the suspend (Job and PyTorchJob
patch) and stall (PyTorchJob delete) scenarios stay so that every permission is exercised.

Real: the operator process (`kopf run -m kubetrain_operator.main`, the kubernetes client, the
progress scrape over HTTP with prometheus-client's parser), the stand-in API server
(standin: kmock-based, with our CRD's admission) and a trainer metrics endpoint served by
prometheus-client. Played by the tests (tests/support/operator_harness.py): the Job controller, the
Kubeflow training operator and the kubelet — they create pods with the controllers' labels and
patch pod and child status as those controllers do. Timings are shrunk through the operator's
settings (resync 1 s, backoff 0.5 s); the operator runs with cluster defaults (trainer image and
ServiceAccount, pull secret) as the chart passes them.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_operator import k8s, permissions
from kubetrain_operator.api import parse_run
from kubetrain_operator.cluster_defaults import ClusterDefaults
from kubetrain_operator.plan import plan_run
from kubetrain_operator.reconcile import metrics_service
from kubetrain_operator.render import metrics_service_name, render_all
from operator_harness import (
    ApiServer,
    Controllers,
    OperatorProcess,
    TrainerMetrics,
    path_of,
    wait_for,
)
from operator_support import NAMESPACE, PREPROCESS_RESULT, result, run_doc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the operator runs as a process

#: What the chart would configure; the operator reads it from its environment.
DEFAULTS = ClusterDefaults(
    trainer_image="registry.example/kubetrain/trainer:test",
    trainer_service_account="kubetrain-trainer",
    image_pull_secrets=("regcred",),
)
DEFAULTS_ENV = {
    "KUBETRAIN_TRAINER_IMAGE": DEFAULTS.trainer_image,
    "KUBETRAIN_TRAINER_SERVICE_ACCOUNT": "kubetrain-trainer",
    "KUBETRAIN_IMAGE_PULL_SECRETS": "regcred",
}


class World:
    def __init__(self, api: ApiServer, op: OperatorProcess) -> None:
        self.api, self.op, self.c = api, op, Controllers(api)
        self.metrics: list[TrainerMetrics] = []

    def trainer_metrics(self, run: str) -> TrainerMetrics:
        served = TrainerMetrics(run)
        self.op.map_metrics(run, served.url)
        self.metrics.append(served)
        return served


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("operator")
    with ApiServer(workdir) as api:
        op = OperatorProcess(api, workdir, **DEFAULTS_ENV).start()
        w = World(api, op)
        try:
            yield w
        finally:
            op.stop()
            for served in w.metrics:
                served.close()


def data_stage(w: World, run: str) -> dict[str, Any]:
    child = w.c.wait_child(run, "preprocess")
    w.c.start(child)
    w.c.finish(child, 0, result("preprocess", **PREPROCESS_RESULT))
    return child


def train_result(run: str, step: int = 100) -> str:
    return result(
        "train",
        step=step,
        totalSteps=100,
        loss=1.25,
        checkpoint={"step": step, "uri": f"s3://out/{run}/checkpoints/step-00000100"},
        outputs={"final": f"s3://out/{run}/final"},
    )


def merge_stage(w: World, run: str) -> None:
    child = w.c.wait_child(run, "merge")
    w.c.start(child)
    w.c.finish(
        child,
        0,
        result(
            "merge",
            perplexity=4.5,
            outputs={"final": f"s3://out/{run}/final", "merged": f"s3://out/{run}/merged"},
        ),
    )


def events_of(w: World, run: str) -> list[dict[str, Any]]:
    return [e for e in w.api.live("events") if (e.get("involvedObject") or {}).get("name") == run]


# ------------------------------------------------------------------------------------ lifecycles
def test_happy_path_with_live_progress_and_fast_status(world: World) -> None:
    w, run = world, "happy"
    w.c.apply(run_doc(run))
    data_stage(w, run)
    w.c.wait_condition(run, "DataReady", "True", "CacheMiss")
    assert w.c.run(run)["status"]["dataset"]["trainTokens"] == PREPROCESS_RESULT["trainTokens"]
    child = w.c.wait_child(run, "train-1")
    assert child["metadata"]["ownerReferences"][0]["kind"] == "TrainingRun"
    served = w.trainer_metrics(run)
    served.step(30, loss=2.5)
    w.c.start(child)

    def shown() -> dict[str, Any] | None:
        progress = (w.c.run(run).get("status") or {}).get("progress") or {}
        return progress if progress.get("step") == 30 else None

    progress = wait_for(shown, 10, what="progress from the metrics endpoint")
    assert progress["totalSteps"] == 100 and progress["loss"] == 2.5
    assert progress["eta"] == "1m10s" and progress["lastStepTime"]
    assert (
        w.c.run(run)["status"]["checkpoint"]["uri"] == f"s3://out/{run}/checkpoints/step-00000030"
    )
    assert w.c.condition(run, "Ready")["message"].startswith("step 30/100")
    served.step(60)
    wait_for(
        lambda: (w.c.run(run)["status"].get("progress") or {}).get("step") == 60,
        10,
        what="progress polled again",
    )
    w.c.finish(child, 0, train_result(run))
    merge_stage(w, run)
    done = w.c.wait_condition(run, "Succeeded", "True")
    status = w.c.run(run)["status"]
    assert status["phase"] == "Succeeded" and status["attempts"] == 1
    assert status["outputs"] == {
        "adapter": f"s3://out/{run}/final",
        "model": f"s3://out/{run}/merged",
    }
    generation = w.c.run(run)["metadata"]["generation"]
    assert all(c["observedGeneration"] == generation for c in status["conditions"])
    assert done["reason"] == "Succeeded"
    wanted = {"AttemptStarted", "CacheMiss", "Succeeded"}
    wait_for(lambda: wanted <= {e["reason"] for e in events_of(w, run)}, 5, what=f"events {wanted}")


def test_a_child_status_change_reaches_the_run_within_two_seconds(world: World) -> None:
    w, run = world, "latency"
    w.c.apply(run_doc(run))
    child = w.c.wait_child(run, "preprocess")
    w.c.start(child)
    time.sleep(1.5)  # past any reconcile triggered by the creation
    started = time.monotonic()
    w.c.finish(child, 0, result("preprocess", **PREPROCESS_RESULT))
    w.c.wait_condition(run, "DataReady", "True", timeout=10)
    assert time.monotonic() - started < 2.0


def test_changed_resources_take_effect_at_the_next_attempt(world: World) -> None:
    w, run = world, "resize"
    w.c.apply(run_doc(run))
    data_stage(w, run)
    first = w.c.wait_child(run, "train-1")
    assert "Worker" not in first["spec"]["pytorchReplicaSpecs"]
    w.c.start(first)
    w.c.patch_spec(run, {"resources": {"nodes": 2, "gpusPerNode": 0}})
    time.sleep(1.5)
    current = next(c for c in w.c.children(run) if c["metadata"]["name"] == f"{run}-train-1")
    assert "Worker" not in current["spec"]["pytorchReplicaSpecs"]  # the running attempt stays
    w.c.finish(first, 143, result("train", False, error="terminated after step 40"))
    second = w.c.wait_child(run, "train-2", timeout=10)
    assert second["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    config = next(c for c in w.api.live("configmaps") if c["metadata"]["name"] == f"{run}-config")
    train = json.loads(next(v for k, v in config["data"].items() if k.startswith("train")))
    assert train["distributed"]["worldSize"] == 2


def test_a_stall_restarts_the_attempt_only_after_its_pods_stopped(world: World) -> None:
    w, run = world, "stall"
    w.c.apply(run_doc(run, stallTimeout="3s"))
    data_stage(w, run)
    child = w.c.wait_child(run, "train-1")
    served = w.trainer_metrics(run)
    served.step(5, at=time.time())
    w.c.start(child)
    # no new step: after 3 s the operator deletes train-1; its pods are being stopped
    wait_for(
        lambda: not [c for c in w.c.children(run) if c["metadata"]["name"].endswith("-train-1")],
        15,
        what="the stalled attempt deleted",
    )
    time.sleep(1.5)
    assert not [c for c in w.c.children(run) if c["metadata"]["name"].endswith("-train-2")], (
        "a second trainer while the first one's pods still run"
    )
    assert w.c.condition(run, "Ready")["reason"] == "Restarting"
    wait_for(lambda: w.c.kubelet(), 10, what="pods of the deleted attempt")
    second = w.c.wait_child(run, "train-2", timeout=10)
    history = w.c.run(run)["status"]["attemptHistory"]
    assert history[0]["result"] == "Stalled" and "no training step" in history[0]["message"]
    assert history[1]["reason"] == "stall"
    served.step(10, at=time.time())
    w.c.start(second)
    w.c.finish(second, 0, train_result(run))
    w.c.wait_child(run, "merge")


def test_a_preprocess_stall_deletes_the_job_and_fails_the_run(world: World) -> None:
    """No heartbeat scraped (none served): the pod's start is the last progress; past
    stallTimeout the Job is deleted and the run fails, and it is not created again."""
    w, run = world, "datastall"
    w.c.apply(run_doc(run, stallTimeout="3s"))
    child = w.c.wait_child(run, "preprocess")
    w.c.start(child)
    wait_for(
        lambda: not [c for c in w.c.children(run) if "-preprocess-" in c["metadata"]["name"]],
        15,
        what="the stalled preprocess Job deleted",
    )
    stalled = w.c.wait_condition(run, "Stalled", "True", "ProgressStalled")
    assert (
        "no preprocessing progress" in stalled["message"]
        and "stallTimeout 3s" in stalled["message"]
    )
    wait_for(lambda: w.c.kubelet(), 10, what="the deleted Job's pod")
    time.sleep(1.5)
    assert not w.c.children(run) and w.c.run(run)["status"]["phase"] == "Failed"


def test_suspend_and_resume(world: World) -> None:
    w, run = world, "pause"
    w.c.apply(run_doc(run))
    data_stage(w, run)
    child = w.c.wait_child(run, "train-1")
    w.c.start(child)
    w.c.patch_spec(run, {"suspend": True})

    def suspended() -> bool:
        current = [c for c in w.c.children(run) if c["metadata"]["name"] == f"{run}-train-1"]
        return bool(current and current[0]["spec"]["runPolicy"].get("suspend") is True)

    wait_for(suspended, 10, what="runPolicy.suspend true on the PyTorchJob")
    w.c.suspend(child)
    w.c.wait_condition(run, "Ready", "False", "Suspended")
    assert w.c.run(run)["status"]["phase"] == "Suspended"
    w.c.patch_spec(run, {"suspend": False})
    wait_for(lambda: not suspended(), 10, what="runPolicy.suspend false again")
    w.c.start(child)
    w.c.wait_condition(run, "Ready", "False", "Training")
    assert w.c.run(run)["status"]["attempts"] == 1  # resumed, not restarted


def test_suspend_during_preprocessing_suspends_the_job(world: World) -> None:
    w, run = world, "pausedata"
    w.c.apply(run_doc(run))
    child = w.c.wait_child(run, "preprocess")
    w.c.start(child)
    w.c.patch_spec(run, {"suspend": True})

    def job_suspended() -> bool:
        jobs = [c for c in w.c.children(run) if c["metadata"]["name"] == child["metadata"]["name"]]
        return bool(jobs and jobs[0]["spec"].get("suspend") is True)

    wait_for(job_suspended, 10, what="spec.suspend true on the preprocess Job")
    w.c.suspend(child)
    w.c.wait_condition(run, "Ready", "False", "Suspended")


def test_the_operator_creates_exactly_what_render_shows(world: World) -> None:
    w, run = world, "render"
    doc = run_doc(run)
    w.c.apply(doc)
    data_stage(w, run)
    child = w.c.wait_child(run, "train-1")
    w.c.start(child)
    w.c.finish(child, 0, train_result(run))
    merge_stage(w, run)
    w.c.wait_condition(run, "Succeeded", "True")
    parsed = parse_run(doc)
    plan = plan_run(parsed, defaults=DEFAULTS)
    expected = {
        (o["kind"], o["metadata"]["name"]): o for o in render_all(parsed, plan, namespace=NAMESPACE)
    }
    created: dict[tuple[str, str], dict[str, Any]] = {}
    for plural in ("configmaps", "services", "jobs", "pytorchjobs"):
        for obj in w.api.live(plural):
            if obj["metadata"].get("labels", {}).get("kubetrain.dev/run") == run:
                created[(obj["kind"], obj["metadata"]["name"])] = obj
    for account in w.api.live("serviceaccounts"):  # shared by the namespace's runs: no run label
        if account["metadata"]["name"] == DEFAULTS.trainer_service_account:
            created[("ServiceAccount", account["metadata"]["name"])] = account
    assert set(created) == set(expected)
    for pod in [t for obj in expected.values() for t in _pod_specs(obj)]:
        assert pod["serviceAccountName"] == "kubetrain-trainer"
        assert pod["automountServiceAccountToken"] is False
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["containers"][0]["image"] == DEFAULTS.trainer_image
    for key, want in expected.items():
        got = created[key]
        owners = got["metadata"].pop("ownerReferences", [])
        assert [o["name"] for o in owners] == ([] if key[0] == "ServiceAccount" else [run])
        for generated in (
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ):
            got["metadata"].pop(generated, None)
        got.pop("status", None)
        assert _subset(want, got), key
    assert metrics_service(run) == metrics_service_name(plan)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Job":
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return []


def _subset(want: Any, got: Any) -> bool:
    """Everything rendered is there, unchanged (the API server may add defaults)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(
            k in got and _subset(v, got[k]) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(want) == len(got)
            and all(_subset(a, b) for a, b in zip(want, got, strict=True))
        )
    return bool(want == got)


def test_operator_metrics_are_served(world: World) -> None:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{world.op.metrics_port}/metrics", timeout=5
    ) as resp:
        text = resp.read().decode()
    for name in (
        "kubetrain_operator_runs",
        "kubetrain_operator_run_attempts_total",
        "kubetrain_operator_stalls_total",
        "kubetrain_operator_reconcile_errors_total",
    ):
        assert name in text
    assert 'kubetrain_operator_run_attempts_total{reason="stall"} 1.0' in text
    assert "kubetrain_operator_stalls_total 2.0" in text  # the training and the preprocess stall
    assert 'kubetrain_operator_runs{phase="Succeeded"}' in text


# --------------------------------------------------------------------------------- audits (last)
def test_no_secret_reaches_status_events_annotations_or_logs(world: World) -> None:
    w, run = world, "leaky"
    planted = {
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "hf_abcdefghijklmnopqrstuvwxyz123456",
    }
    w.api.request(
        "POST",
        path_of("v1", "secrets", NAMESPACE),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
                "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            },
        },
    )
    w.c.apply(run_doc(run))
    child = w.c.wait_child(run, "preprocess")
    w.c.start(child)
    error = (
        "reading s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@data/x "
        "failed with HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz123456"
    )
    w.c.finish(child, 1, result("preprocess", False, error=error))
    w.c.wait_condition(run, "Stalled", "True")
    time.sleep(1.0)
    scanned = [
        json.dumps(r.get("status")) + json.dumps(r["metadata"].get("annotations"))
        for r in w.api.live("trainingruns")
    ]
    scanned += [json.dumps(e) for e in w.api.live("events")]
    for plural in ("configmaps", "services", "jobs", "pytorchjobs"):
        scanned += [json.dumps(o["metadata"].get("annotations")) for o in w.api.live(plural)]
    scanned.append(w.op.logs())
    hits = [(secret, i) for secret in planted for i, text in enumerate(scanned) if secret in text]
    assert hits == []
    assert "[REDACTED]" in json.dumps(w.c.run(run)["status"])


def test_the_log_has_no_reconcile_errors(world: World) -> None:
    logs = world.op.logs()
    assert "Traceback" not in logs, logs[-4000:]
    assert Path(world.op.log).exists()


def test_every_request_is_in_permissions_and_every_permission_is_used(world: World) -> None:
    """What the operator asked during every lifecycle above ⊆ permissions.py ⊆ what it asked.
    (The stand-in records a watch when it ends: the operator stops first.)"""
    world.op.stop()
    asked = {
        (c.verb, c.group, c.resource)
        for c in world.api.calls()
        if not c.user_agent.startswith("kubetrain-tests")
    }
    granted = {
        (verb, rule.api_group, resource)
        for rule in (*permissions.CLUSTER_RULES, *permissions.NAMESPACED_RULES)
        for resource in rule.resources
        for verb in rule.verbs
    }
    assert asked <= granted, sorted(asked - granted)
    assert granted <= asked, sorted(granted - asked)
    assert asked >= k8s.CALLS
