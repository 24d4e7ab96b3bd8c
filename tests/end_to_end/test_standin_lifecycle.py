"""The whole lifecycle of a TrainingRun, typed as a user types it: on the cluster stand-in, and
(opt-in, `pytest --kube-context NAME -m e2e`) on a real cluster with the same tests.

Real: the operator process (`kopf run --standalone -m kubetrain_operator.main`; on a real cluster
the installed one), kubectl 1.37 (apply, get, get -w, wait, patch, delete), every trainer stage as
real processes (preprocess, sanity, torchrun + train, merge/eval) with real exit codes,
checkpoints and metrics, the operator's scrape of the metrics Service, signals (SIGKILL, SIGSTOP,
SIGTERM). Emulated on the stand-in (standin, docs/standin.md): the API server, the kubelet
(pods are local processes in their own mount namespace, PVC `data` is a directory), the Job
controller and the Kubeflow training operator. Runs are the shipped tiny CPU example with few
steps; one cluster and one operator serve the module, each test its own run.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from runspecs import DELETE, ROOT
from standin import start_cluster
from standin_support import (
    ClusterBackend,
    Kubectl,
    StandInBackend,
    condition,
    losses_of,
    newest_complete,
    operator_process,
    tiny_run,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
STEPS = 120
TRAINING = {
    "spec.training.maxSteps": STEPS,
    "spec.training.loggingSteps": 1,
    "spec.checkpoints": {"everySteps": 20, "keep": 10},
}
NO_SANITY = {"spec.sanity": DELETE}
FIGURES: dict[str, float] = {}
Backend = StandInBackend | ClusterBackend


@pytest.fixture(scope="module", params=["standin", pytest.param("cluster", marks=pytest.mark.e2e)])
def backend(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Backend]:
    corpus = (ROOT / "examples" / "data" / "tinystories-cpu.txt").read_bytes()
    if request.param == "standin":
        with start_cluster(tmp_path_factory.mktemp("standin")) as standin:
            found = StandInBackend(standin)
            found.claim.mkdir(parents=True, exist_ok=True)
            found.put_file("tinystories-cpu.txt", corpus)
            found.kubectl.run("apply", "-f", str(ROOT / "crds"))
            with operator_process(standin):
                yield found
    else:
        cluster = ClusterBackend(
            pytestconfig.getoption("--kube-context"),
            f"kubetrain-e2e-{uuid.uuid4().hex[:6]}",
            pytestconfig.getoption("--e2e-image"),
        )
        cluster.put_file("tinystories-cpu.txt", corpus)
        try:
            yield cluster
        finally:
            cluster.close()
    if FIGURES:  # the figures the issue asks for, measured below: printed, and kept in the cache
        if pytestconfig.cache is not None:  # None under -p no:cacheprovider
            pytestconfig.cache.set(f"standin/figures/{request.param}", FIGURES)
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            for key, value in FIGURES.items():
                print(f"\nlifecycle on {request.param}: {key}: {value:.1f}", end="")
            print()


@pytest.fixture(scope="module")
def kubectl(backend: Backend) -> Kubectl:
    return backend.kubectl


def apply_run(backend: Backend, name: str, *layers: dict[str, Any]) -> None:
    """The tiny example as `name`, with the changes of each layer (later layers win)."""
    changes = {key: value for layer in layers for key, value in layer.items()}
    backend.kubectl.apply(backend.prepare(tiny_run(name, **changes)))


def run_object(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return dict(kubectl.json("get", "tr", name))


def succeeded(kubectl: Kubectl, name: str, timeout: int = 600) -> dict[str, Any]:
    """The run once it has Succeeded; fails at once when it fails or stalls instead."""

    def finished() -> dict[str, Any] | None:
        obj = run_object(kubectl, name)
        stalled = condition(obj, "Stalled") or {}
        done = obj.get("status", {}).get("phase") in ("Succeeded", "Failed")
        return obj if done or stalled.get("status") == "True" else None

    obj = wait_for(finished, timeout, f"{name} to finish", every=1.0)
    assert (condition(obj, "Succeeded") or {}).get("status") == "True", obj.get("status")
    return obj


def checkpoint_done(backend: Backend, run: str, step: int) -> bool:
    """The checkpoint is complete; fails at once if the run's first attempt died before it."""
    for job in backend.objects("pytorchjobs"):
        failed = condition(job, "Failed") or {}
        if job["metadata"]["name"] == f"{run}-train-1" and failed.get("status") == "True":
            raise AssertionError(f"attempt 1 of {run} failed on its own: {failed.get('message')}")
    return backend.read(f"runs/{run}/checkpoints/step-{step:08d}/COMPLETE") is not None


def final_losses(backend: Backend, run: str) -> dict[int, float]:
    newest = newest_complete(backend, run)
    assert newest is not None, f"{run} has no complete checkpoint"
    raw = backend.read(f"{newest}/trainer_state.json")
    assert raw is not None
    return losses_of(raw)


@pytest.fixture(scope="module")
def happy(backend: Backend, kubectl: Kubectl) -> dict[str, Any]:
    """One run of the example, watched as a user watches it; the tests below read it."""
    start = time.monotonic()
    watch = kubectl.watch("get", "tr", "-w")
    apply_run(backend, "happy", TRAINING)
    tables: list[str] = []

    def training_row() -> bool:
        """A row in the Training phase with STEP, LOSS and ETA, or the run past training (the
        test below then says what it missed). The phase column itself, not "Training" anywhere
        in the table, and the status's step alone is not the row a user reads."""
        table = kubectl.run("get", "tr", "happy").stdout
        tables.append(table)
        rows = table_rows(table)
        phase = rows[0]["PHASE"] if rows else ""
        shown = rows and all(rows[0][c] not in ("", "<none>") for c in ("STEP", "LOSS", "ETA"))
        return (phase == "Training" and bool(shown)) or phase in ("Merging", "Succeeded", "Failed")

    wait_for(training_row, 600, "the run to train with progress", every=0.3)
    waited = kubectl.run(
        "wait", "--for=condition=Succeeded", "tr/happy", "--timeout=600s", check=False, timeout=630
    )
    obj = run_object(kubectl, "happy")
    assert waited.returncode == 0, (waited.stderr, obj.get("status"))
    FIGURES["happy path wall time (s)"] = time.monotonic() - start
    watch.terminate()
    streamed = watch.communicate(timeout=10)[0]
    return {"obj": obj, "tables": tables, "watch": streamed}


def test_happy_path_goes_through_every_stage_to_succeeded(happy: dict[str, Any]) -> None:
    status = happy["obj"]["status"]
    assert status["phase"] == "Succeeded"
    for kind in ("Succeeded", "Ready", "DataReady", "SanityPassed"):
        assert condition(happy["obj"], kind)["status"] == "True", kind
    assert status["completedStages"] == ["preprocess", "sanity-1", "train", "merge"]
    assert status["progress"]["step"] == STEPS
    assert status["attempts"] == 1


def table_rows(table: str) -> list[dict[str, str]]:
    """kubectl's aligned columns, cut at the header's offsets: an empty cell (no step yet) stays
    empty instead of shifting the next column into its place."""
    header, *lines = table.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    return [
        {name: line[a:b].strip() for name, a, b in zip(header.split(), starts, ends, strict=True)}
        for line in lines
    ]


def test_get_tr_shows_phase_step_loss_and_eta_while_training(happy: dict[str, Any]) -> None:
    header = happy["tables"][0].splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "STEP", "LOSS", "ETA", "READY"]
    rows = [row for table in happy["tables"] for row in table_rows(table)]
    training = [
        row
        for row in rows
        if row["PHASE"] == "Training" and row["STEP"] and row["ETA"] not in ("", "<none>")
    ]
    assert training, rows
    row = training[-1]
    assert int(row["STEP"]) > 0 and float(row["LOSS"]) > 0


def test_get_tr_watch_streams_the_columns(happy: dict[str, Any]) -> None:
    lines = happy["watch"].splitlines()
    assert lines[0].split()[:3] == ["NAME", "PHASE", "STEP"]
    phases = [
        line.split()[1] for line in lines[1:] if line.startswith("happy ") and len(line.split()) > 2
    ]
    assert "Training" in phases and phases[-1] == "Succeeded", lines


def test_happy_path_model_and_perplexity(backend: Backend, happy: dict[str, Any]) -> None:
    assert happy["obj"]["status"]["evaluation"]["perplexity"] > 1
    assert backend.read("runs/happy/final/model.safetensors")
    assert backend.read("runs/happy/final/tokenizer.json")


def test_admission_refuses_an_invalid_spec_naming_the_field(
    backend: Backend, kubectl: Kubectl
) -> None:
    doc = backend.prepare(tiny_run("bad-lr", **{"spec.training.learningRate": -1}))
    refused = kubectl.apply(doc, check=False)
    assert refused.returncode == 1
    assert 'The TrainingRun "bad-lr" is invalid' in refused.stderr
    assert "spec.training.learningRate" in refused.stderr
    assert kubectl.run("get", "tr", "bad-lr", check=False).returncode == 1


def test_a_spec_the_crd_admits_but_the_model_refuses_gets_invalid_spec(
    backend: Backend, kubectl: Kubectl
) -> None:
    apply_run(backend, "bad-selector", {"spec.resources.nodeSelector": {"bad key!": "x"}})
    ready = wait_for(
        lambda: condition(run_object(kubectl, "bad-selector"), "Ready"), 120, "a Ready condition"
    )
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.resources.nodeSelector" in ready["message"]
    assert not [
        j for j in backend.objects("jobs") if j["metadata"]["name"].startswith("bad-selector")
    ]
    kubectl.run("delete", "tr", "bad-selector")


def test_sigkill_mid_run_resumes_from_the_newest_checkpoint(
    backend: Backend, kubectl: Kubectl, happy: dict[str, Any]
) -> None:
    apply_run(backend, "resume", TRAINING, NO_SANITY)
    wait_for(
        lambda: (
            checkpoint_done(backend, "resume", 40)
            and backend.signal_trainer("resume-train-1-master-0", signal.SIGKILL)
        ),
        600,
        "the trainer past its second checkpoint, killed",
        every=0.05,
    )
    killed = time.monotonic()
    wait_for(
        lambda: "step " in backend.pod_log("resume-train-2-master-0"),
        600,
        "attempt 2 to make its first step",
        every=0.1,
    )
    FIGURES["pod kill → new attempt's first step (s)"] = time.monotonic() - killed
    obj = succeeded(kubectl, "resume")
    assert obj["status"]["attempts"] == 2
    assert obj["status"]["progress"]["step"] == STEPS
    resumed, baseline = final_losses(backend, "resume"), final_losses(backend, "happy")
    assert max(resumed) == STEPS == max(baseline)
    after = [s for s in resumed if s > 40]
    differing = [
        (s, resumed[s], baseline[s]) for s in after if abs(resumed[s] - baseline[s]) > 1e-5
    ]
    assert after and not differing, differing


def test_a_stalled_trainer_is_replaced_by_a_new_attempt(backend: Backend, kubectl: Kubectl) -> None:
    # the timeout must cover a fresh attempt's start-up too (torch, transformers imports)
    apply_run(backend, "stall", TRAINING, NO_SANITY, {"spec.stallTimeout": "40s"})
    wait_for(
        lambda: (
            checkpoint_done(backend, "stall", 40)
            and backend.signal_trainer("stall-train-1-master-0", signal.SIGSTOP)
        ),
        600,
        "the trainer past its second checkpoint, stopped",
        every=0.05,
    )
    stopped = time.monotonic()
    try:
        wait_for(
            lambda: [
                j
                for j in backend.objects("pytorchjobs")
                if j["metadata"]["name"] == "stall-train-2"
            ],
            600,
            "a new attempt after the stall",
        )
        FIGURES["stall → restart (new attempt created) (s)"] = time.monotonic() - stopped
    finally:
        backend.signal_trainer("stall-train-1-master-0", signal.SIGCONT)
    obj = succeeded(kubectl, "stall")
    assert obj["status"]["attempts"] == 2
    assert obj["status"]["progress"]["step"] == STEPS
    first = [e for e in obj["status"].get("attemptHistory", []) if e["attempt"] == 1]
    assert first and "stall" in json.dumps(first[0]).lower(), obj["status"].get("attemptHistory")


def test_bad_data_above_max_rejected_fraction_stalls_without_a_new_attempt(
    backend: Backend, kubectl: Kubectl
) -> None:
    rows = ['{"text": "a fine line of text that the tokenizer will accept"}'] * 50
    rows += ['{"body": "no text field here"}'] * 50
    backend.put_file("bad.jsonl", ("\n".join(rows) + "\n").encode())
    apply_run(backend, "bad-data", NO_SANITY, {"spec.data.train": ["pvc://data/bad.jsonl"]})
    stalled = wait_for(
        lambda: (
            (c := condition(run_object(kubectl, "bad-data"), "Stalled"))
            and c["status"] == "True"
            and c
        ),
        300,
        "Stalled=True",
    )
    assert "reject" in stalled["message"].lower(), stalled
    time.sleep(5)  # a retry would have started by now (backoff 0.5-2 s)
    jobs = [
        j["metadata"]["name"]
        for j in backend.objects("jobs")
        if j["metadata"]["name"].startswith("bad-data")
    ]
    assert len(jobs) == 1, jobs
    pods = [p for p in backend.objects("pods") if p["metadata"]["name"].startswith(jobs[0])]
    assert len(pods) == 1
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2
    kubectl.run("delete", "tr", "bad-data")


def test_suspend_stops_after_a_checkpoint_and_resume_continues_from_it(
    backend: Backend, kubectl: Kubectl
) -> None:
    steps = 300  # a checkpoint at 100, then time to suspend before the end
    apply_run(
        backend,
        "pause",
        TRAINING,
        NO_SANITY,
        {"spec.training.maxSteps": steps, "spec.checkpoints": {"everySteps": 100, "keep": 10}},
    )
    wait_for(lambda: checkpoint_done(backend, "pause", 100), 600, "a first checkpoint", every=0.05)
    kubectl.run("patch", "tr", "pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: not backend.running_processes("pause-train"), 300, "the training pods to stop")
    saved = newest_complete(backend, "pause")
    assert saved is not None and int(saved.rsplit("-", 1)[1]) > 100, saved  # the SIGTERM one
    kubectl.run("patch", "tr", "pause", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    obj = succeeded(kubectl, "pause")
    assert obj["status"]["progress"]["step"] == steps
    assert max(final_losses(backend, "pause")) == steps


def test_two_nodes_train_through_the_pytorchjob_env(backend: Backend, kubectl: Kubectl) -> None:
    apply_run(
        backend,
        "twonode",
        TRAINING,
        NO_SANITY,
        {"spec.training.maxSteps": 20, "spec.resources.nodes": 2},
    )
    obj = succeeded(kubectl, "twonode")
    (job,) = [
        j for j in backend.objects("pytorchjobs") if j["metadata"]["name"] == "twonode-train-1"
    ]
    assert job["status"]["replicaStatuses"]["Worker"]["succeeded"] == 1
    assert job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    (worker,) = [
        p for p in backend.objects("pods") if p["metadata"]["name"] == "twonode-train-1-worker-0"
    ]
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert (env["RANK"], env["WORLD_SIZE"], env["PET_NNODES"]) == ("1", "2", "2")
    assert env["MASTER_ADDR"] == "twonode-train-1-master-0"
    assert obj["status"]["progress"]["step"] == 20


def _chat_and_preference_rows() -> tuple[bytes, bytes]:
    """Chat and preference rows cut from the shipped corpus (real text, not typed here)."""
    text = (ROOT / "examples" / "data" / "tinystories-cpu.txt").read_text()
    stories = [s.strip() for s in text.split("\n\n") if s.strip().count(". ") >= 2][:400]
    chat, prefs = [], []
    for index, story in enumerate(stories):
        first, rest = story.split(". ", 1)
        other = stories[(index + 7) % len(stories)].split(". ", 1)[1]
        chat.append(
            {
                "messages": [
                    {"role": "user", "content": first + "."},
                    {"role": "assistant", "content": rest},
                ]
            }
        )
        prefs.append({"prompt": first + ".", "chosen": rest, "rejected": other})
    encode = lambda rows: ("\n".join(json.dumps(r) for r in rows) + "\n").encode()  # noqa: E731
    return encode(chat), encode(prefs)


def test_sft_then_dpo_chain_waits_and_starts_from_the_sft_output(
    backend: Backend, kubectl: Kubectl, happy: dict[str, Any]
) -> None:
    chat, prefs = _chat_and_preference_rows()
    backend.put_file("chat.jsonl", chat)
    backend.put_file("prefs.jsonl", prefs)
    common = {
        **TRAINING,
        **NO_SANITY,
        "spec.tokenizer": DELETE,
        "spec.data.chatTemplate": "tulu",
        "spec.data.validationFraction": 0.05,
    }
    apply_run(
        backend,
        "chain-dpo",
        common,
        {
            "spec.model": {"fromRun": "chain-sft"},
            "spec.method": {"stage": "dpo"},
            "spec.data.format": "preference",
            "spec.data.train": ["pvc://data/prefs.jsonl"],
            "spec.training.maxSteps": 10,
        },
    )
    apply_run(
        backend,
        "chain-sft",
        common,
        {
            "spec.model": {"uri": "pvc://data/runs/happy/final"},
            "spec.method": {"stage": "sft"},
            "spec.data.format": "chat",
            "spec.data.train": ["pvc://data/chat.jsonl"],
            "spec.training.maxSteps": 20,
        },
    )
    time.sleep(3)
    assert not [
        j for j in backend.objects("pytorchjobs") if j["metadata"]["name"].startswith("chain-dpo")
    ], "DPO started before SFT"
    sft = succeeded(kubectl, "chain-sft")
    dpo = succeeded(kubectl, "chain-dpo")
    (train,) = [
        j for j in backend.objects("pytorchjobs") if j["metadata"]["name"] == "chain-dpo-train-1"
    ]
    sft_done = condition(sft, "Succeeded")["lastTransitionTime"]
    assert train["metadata"]["creationTimestamp"] >= sft_done
    (config,) = [
        c for c in backend.objects("configmaps") if c["metadata"]["name"] == "chain-dpo-config"
    ]
    assert "runs/chain-sft/final" in config["data"]["train.json"]
    assert dpo["status"]["progress"]["step"] == 10


def test_delete_removes_every_child_and_pod(
    backend: Backend, kubectl: Kubectl, happy: dict[str, Any]
) -> None:
    kubectl.run("delete", "tr", "happy", "--timeout=300s", timeout=330)

    def leftovers() -> list[str]:
        return [
            f"{plural}/{o['metadata']['name']}"
            for plural in ("jobs", "pytorchjobs", "pods", "configmaps", "services")
            for o in backend.objects(plural)
            if o["metadata"]["name"].startswith("happy-")
        ]

    wait_for(lambda: not leftovers(), 300, "every child of the run to go")
    assert not backend.running_processes("happy-")
