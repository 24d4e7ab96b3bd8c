"""The whole lifecycle of a TrainingRun on the cluster stand-in, typed as a user types it.

Real: the operator process (`kopf run --standalone -m kubetrain_operator.main`), kubectl 1.37
(apply, get, get -w, wait, patch, delete), every trainer stage as real processes (preprocess,
sanity, torchrun + train, merge/eval) with real exit codes, checkpoints and metrics, the
operator's scrape of the metrics Service, signals (SIGKILL, SIGSTOP, SIGTERM).
Emulated (tests/standin, docs/standin.md): the API server, the kubelet (pods are local processes
in their own mount namespace, PVC `data` is a directory), the Job controller and the Kubeflow
training operator. Runs are the shipped tiny CPU example with few steps; one cluster and one
operator serve the module, each test its own run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runspecs import DELETE
from standin import StandIn, start_cluster
from standin_support import (
    CLAIM,
    Kubectl,
    condition,
    losses,
    newest_checkpoint,
    operator_process,
    pod_log,
    put_data,
    tiny_run,
    trainer_pid,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
STEPS = 120
TRAINING = {
    "spec.training.maxSteps": STEPS,
    "spec.training.loggingSteps": 1,
    "spec.checkpoints": {"everySteps": 20, "keep": 10},
}
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[StandIn]:
    with start_cluster(tmp_path_factory.mktemp("standin")) as standin:
        put_data(standin)
        kubectl = Kubectl(standin)
        kubectl.run("apply", "-f", str(Path(__file__).parents[1] / "crds"))
        with operator_process(standin):
            yield standin
    # the figures the issue asks for, measured by the tests above (also in figures.json)
    (standin.workdir / "figures.json").write_text(json.dumps(FIGURES, indent=1))
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    for key, value in FIGURES.items():
        line = f"stand-in lifecycle: {key}: {value:.1f}"
        reporter.write_line(line) if reporter is not None else print(line)


@pytest.fixture(scope="module")
def kubectl(cluster: StandIn) -> Kubectl:
    return Kubectl(cluster)


def output(cluster: StandIn, run: str) -> Path:
    return cluster.workdir / "pvcs" / CLAIM / "runs" / run


def run_object(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return dict(kubectl.json("get", "tr", name))


def succeeded(kubectl: Kubectl, name: str, timeout: int = 420) -> dict[str, Any]:
    done = kubectl.run(
        "wait",
        "--for=condition=Succeeded",
        f"tr/{name}",
        f"--timeout={timeout}s",
        check=False,
        timeout=timeout + 30,
    )
    obj = run_object(kubectl, name)
    assert done.returncode == 0, (done.stderr, obj.get("status"))
    return obj


@pytest.fixture(scope="module")
def happy(cluster: StandIn, kubectl: Kubectl) -> dict[str, Any]:
    """One run of the example, watched as a user watches it; the tests below read it."""
    start = time.monotonic()
    watch = kubectl.watch("get", "tr", "-w")
    kubectl.apply(tiny_run("happy", **TRAINING))
    rows: list[str] = []

    def training_row() -> bool:
        table = kubectl.run("get", "tr", "happy").stdout
        rows.append(table)
        return (
            "Training" in table
            and run_object(kubectl, "happy").get("status", {}).get("progress", {}).get("step", 0)
            > 0
        )

    wait_for(training_row, 300, "the run to train with progress", every=0.3)
    obj = succeeded(kubectl, "happy")
    FIGURES["happy path wall time (s)"] = time.monotonic() - start
    watch.terminate()
    streamed = watch.communicate(timeout=10)[0]
    return {"obj": obj, "tables": rows, "watch": streamed}


def test_happy_path_goes_through_every_stage_to_succeeded(happy: dict[str, Any]) -> None:
    status = happy["obj"]["status"]
    assert status["phase"] == "Succeeded"
    for kind in ("Succeeded", "Ready", "DataReady", "SanityPassed"):
        assert condition(happy["obj"], kind)["status"] == "True", kind
    assert status["completedStages"] == ["preprocess", "sanity-1", "train", "merge"]
    assert status["progress"]["step"] == STEPS
    assert status["attempts"] == 1


def test_get_tr_shows_phase_step_loss_and_eta_while_training(happy: dict[str, Any]) -> None:
    header = happy["tables"][0].splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "STEP", "LOSS", "ETA", "READY"]
    training = [t.splitlines()[1].split() for t in happy["tables"] if "Training" in t]
    row = training[-1]
    assert row[1] == "Training" and int(row[2]) > 0 and float(row[3]) > 0 and row[4] != "<none>"


def test_get_tr_watch_streams_the_columns(happy: dict[str, Any]) -> None:
    lines = happy["watch"].splitlines()
    assert lines[0].split()[:3] == ["NAME", "PHASE", "STEP"]
    phases = [
        line.split()[1] for line in lines[1:] if line.startswith("happy ") and len(line.split()) > 2
    ]
    assert "Training" in phases and phases[-1] == "Succeeded", lines


def test_happy_path_model_and_perplexity(cluster: StandIn, happy: dict[str, Any]) -> None:
    status = happy["obj"]["status"]
    assert status["evaluation"]["perplexity"] > 1
    final = output(cluster, "happy") / "final"
    assert (final / "model.safetensors").stat().st_size > 0
    assert (final / "tokenizer.json").exists()


def test_admission_refuses_an_invalid_spec_naming_the_field(kubectl: Kubectl) -> None:
    doc = tiny_run("bad-lr", **{"spec.training.learningRate": -1})
    refused = kubectl.apply(doc, check=False)
    assert refused.returncode == 1
    assert 'The TrainingRun "bad-lr" is invalid' in refused.stderr
    assert "spec.training.learningRate" in refused.stderr
    assert kubectl.run("get", "tr", "bad-lr", check=False).returncode == 1


def test_a_spec_the_crd_admits_but_the_model_refuses_gets_invalid_spec(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    kubectl.apply(tiny_run("bad-selector", **{"spec.resources.nodeSelector": {"bad key!": "x"}}))
    ready = wait_for(
        lambda: condition(run_object(kubectl, "bad-selector"), "Ready"), 60, "a Ready condition"
    )
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.resources.nodeSelector" in ready["message"]
    assert not [
        j
        for j in cluster.objects("batch", "jobs")
        if j["metadata"]["name"].startswith("bad-selector")
    ]
    kubectl.run("delete", "tr", "bad-selector")


def test_sigkill_mid_run_resumes_from_the_newest_checkpoint(
    cluster: StandIn, kubectl: Kubectl, happy: dict[str, Any]
) -> None:
    kubectl.apply(tiny_run("resume", **TRAINING, **{"spec.sanity": DELETE}))
    out = output(cluster, "resume")
    pid = wait_for(
        lambda: (
            trainer_pid(cluster, "resume-train-1-master-0")
            if (out / "checkpoints" / "step-00000040" / "COMPLETE").exists()
            else None
        ),
        300,
        "the trainer to pass its second checkpoint",
        every=0.05,
    )
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: "step " in pod_log(cluster, "resume-train-2-master-0"),
        300,
        "attempt 2 to make its first step",
        every=0.1,
    )
    FIGURES["pod kill → new attempt's first step (s)"] = time.monotonic() - killed
    obj = succeeded(kubectl, "resume")
    assert obj["status"]["attempts"] == 2
    assert obj["status"]["progress"]["step"] == STEPS
    log = pod_log(cluster, "resume-train-2-master-0")
    resumed = losses(newest_checkpoint(out))
    baseline = losses(newest_checkpoint(output(cluster, "happy")))
    assert max(resumed) == STEPS == max(baseline)
    first_new = min(s for s in resumed if s > 40)
    after = [s for s in resumed if s >= first_new]
    assert after and all(abs(resumed[s] - baseline[s]) <= 1e-5 for s in after), (
        [(s, resumed[s], baseline[s]) for s in after if abs(resumed[s] - baseline[s]) > 1e-5],
        log[-2000:],
    )


def test_a_stalled_trainer_is_replaced_by_a_new_attempt(cluster: StandIn, kubectl: Kubectl) -> None:
    kubectl.apply(
        tiny_run("stall", **TRAINING, **{"spec.sanity": DELETE, "spec.stallTimeout": "8s"})
    )
    out = output(cluster, "stall")
    pid = wait_for(
        lambda: (
            trainer_pid(cluster, "stall-train-1-master-0")
            if (out / "checkpoints" / "step-00000040" / "COMPLETE").exists()
            else None
        ),
        300,
        "the trainer to pass its second checkpoint",
        every=0.05,
    )
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(
            lambda: cluster.get("kubeflow.org", "pytorchjobs", "default", "stall-train-2"),
            300,
            "a new attempt after the stall",
        )
        FIGURES["stall → restart (new attempt created) (s)"] = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    obj = succeeded(kubectl, "stall")
    assert obj["status"]["attempts"] == 2
    assert obj["status"]["progress"]["step"] == STEPS
    stalled = [e for e in obj["status"].get("attemptHistory", []) if e["attempt"] == 1]
    assert stalled and "stall" in str(stalled[0]).lower(), obj["status"].get("attemptHistory")


def test_bad_data_above_max_rejected_fraction_stalls_without_a_new_attempt(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    claim = cluster.workdir / "pvcs" / CLAIM
    rows = ['{"text": "a fine line of text that the tokenizer will accept"}'] * 50
    rows += ['{"body": "no text field here"}'] * 50
    (claim / "bad.jsonl").write_text("\n".join(rows) + "\n")
    kubectl.apply(
        tiny_run(
            "bad-data", **{"spec.data.train": [f"pvc://{CLAIM}/bad.jsonl"], "spec.sanity": DELETE}
        )
    )
    stalled = wait_for(
        lambda: (
            (c := condition(run_object(kubectl, "bad-data"), "Stalled"))
            and c["status"] == "True"
            and c
        ),
        240,
        "Stalled=True",
    )
    assert "reject" in stalled["message"].lower(), stalled
    time.sleep(5)  # a retry would have started by now (backoff 0.5-2 s)
    jobs = [
        j["metadata"]["name"]
        for j in cluster.objects("batch", "jobs")
        if j["metadata"]["name"].startswith("bad-data")
    ]
    assert len(jobs) == 1, jobs
    pods = [p for p in cluster.objects("", "pods") if p["metadata"]["name"].startswith(jobs[0])]
    assert len(pods) == 1
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2
    kubectl.run("delete", "tr", "bad-data")


def test_suspend_stops_after_a_checkpoint_and_resume_continues_from_it(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    steps = 400
    kubectl.apply(
        tiny_run(
            "pause",
            **TRAINING,
            **{
                "spec.sanity": DELETE,
                "spec.training.maxSteps": steps,
                "spec.checkpoints": {"everySteps": 100, "keep": 10},
            },
        )
    )
    out = output(cluster, "pause")
    wait_for(
        lambda: (
            (out / "checkpoints" / "step-00000100" / "COMPLETE").exists()
            and trainer_pid(cluster, "pause-train-1-master-0")
        ),
        300,
        "a checkpoint",
        every=0.05,
    )
    kubectl.run("patch", "tr", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(
        lambda: (
            not [
                p
                for p in cluster.objects("", "pods")
                if p["metadata"]["name"].startswith("pause-train")
                and p["status"].get("phase") in ("Pending", "Running")
            ]
        ),
        120,
        "the training pods to stop",
    )
    saved = newest_checkpoint(out)
    assert saved is not None and int(saved.name.split("-")[1]) > 100, saved
    kubectl.run("patch", "tr", "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    obj = succeeded(kubectl, "pause")
    assert obj["status"]["progress"]["step"] == steps
    assert max(losses(newest_checkpoint(out))) == steps


def test_two_nodes_train_through_the_pytorchjob_env(cluster: StandIn, kubectl: Kubectl) -> None:
    kubectl.apply(
        tiny_run(
            "twonode",
            **TRAINING,
            **{"spec.sanity": DELETE, "spec.training.maxSteps": 20, "spec.resources.nodes": 2},
        )
    )
    obj = succeeded(kubectl, "twonode")
    job = cluster.get("kubeflow.org", "pytorchjobs", "default", "twonode-train-1")
    assert job["status"]["replicaStatuses"]["Worker"]["succeeded"] == 1
    assert job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    worker = cluster.get("", "pods", "default", "twonode-train-1-worker-0")
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert (env["RANK"], env["WORLD_SIZE"], env["PET_NNODES"]) == ("1", "2", "2")
    assert env["MASTER_ADDR"] == "twonode-train-1-master-0"
    assert obj["status"]["progress"]["step"] == 20


def test_delete_removes_every_child_and_pod(
    cluster: StandIn, kubectl: Kubectl, happy: dict[str, Any]
) -> None:
    kubectl.run("delete", "tr", "happy", "--timeout=120s")

    def leftovers() -> list[str]:
        found = []
        for group, plural in (
            ("batch", "jobs"),
            ("kubeflow.org", "pytorchjobs"),
            ("", "pods"),
            ("", "configmaps"),
            ("", "services"),
        ):
            found += [
                f"{plural}/{o['metadata']['name']}"
                for o in cluster.objects(group, plural)
                if o["metadata"]["name"].startswith("happy-")
            ]
        return found

    wait_for(lambda: not leftovers(), 120, "every child of the run to go")
    assert not [c for c in cluster.runner.running.values() if c.name.startswith("happy-")]
