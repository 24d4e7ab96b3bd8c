"""What the operator tests share: TrainingRun documents, and the controllers' side of the world.

The Job controller and the Kubeflow training operator are played here the way they write objects:
pods labelled `batch.kubernetes.io/job-name` or `training.kubeflow.org/job-name` +
`training.kubeflow.org/replica-type`, container states with exit codes and termination messages,
Job conditions (Complete/Failed/Suspended) and PyTorchJob conditions (Created/Running/Succeeded/
Failed/Suspended). These are inputs, never expected values.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from kubetrain_operator.render import LABEL_RUN, LABEL_STAGE

NAMESPACE = "ml"


def run_doc(name: str = "sft", **spec_changes: Any) -> dict[str, Any]:
    """A small valid fine-tune on S3 (CPU, no sanity gate), with top-level spec keys replaced."""
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/base"},
        "data": {"format": "text", "train": ["s3://data/train.jsonl"], "blockSize": 128},
        "method": {"stage": "sft", "adapter": {"type": "lora"}},
        "training": {"maxSteps": 100, "precision": "fp32"},
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "output": {"uri": f"s3://out/{name}", "merge": True},
        "storage": {"s3": {"secretName": "s3-credentials"}},
        "maxRestarts": 2,
        "stallTimeout": "1m",
    }
    spec.update(copy.deepcopy(spec_changes))
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def stored(doc: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    """The document as the API server returns it (uid, generation)."""
    out = copy.deepcopy(doc)
    out["metadata"].setdefault("uid", str(uuid.uuid4()))
    out["metadata"]["generation"] = generation
    return out


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, at: float, status: str = "True", message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": type_,
        "message": message,
        "lastTransitionTime": iso(at),
        "lastUpdateTime": iso(at),
    }


def with_conditions(child: dict[str, Any], *conditions: dict[str, Any]) -> dict[str, Any]:
    """The child with its controller's status conditions (what the controller PATCHes)."""
    out = copy.deepcopy(child)
    out.setdefault("status", {})["conditions"] = list(conditions)
    return out


def job_status(kind: str, state: str, at: float) -> dict[str, Any]:
    """The status a Job or PyTorchJob controller writes for state running|succeeded|failed|
    suspended."""
    if kind == "Job":
        names = {
            "running": [],
            "succeeded": ["Complete"],
            "failed": ["Failed"],
            "suspended": ["Suspended"],
        }[state]
        status: dict[str, Any] = {"conditions": [condition(n, at) for n in names]}
        status["startTime"] = iso(at)
        if state == "running":
            status["active"] = 1
        return status
    names = {
        "running": ["Created", "Running"],
        "succeeded": ["Created", "Succeeded"],
        "failed": ["Created", "Failed"],
        "suspended": ["Created", "Suspended"],
    }[state]
    return {"conditions": [condition(n, at) for n in names], "startTime": iso(at)}


def pod_for(
    child: dict[str, Any],
    *,
    index: int = 0,
    replica: str = "master",
    phase: str = "Running",
    exit_code: int | None = None,
    message: str | None = None,
    at: float = 0.0,
) -> dict[str, Any]:
    """A pod as the child's controller creates it: the template's labels plus its own."""
    name = child["metadata"]["name"]
    kind = child["kind"]
    if kind == "Job":
        template = child["spec"]["template"]
        labels = {
            **template["metadata"]["labels"],
            "batch.kubernetes.io/job-name": name,
            "job-name": name,
        }
        pod_name, container = f"{name}-{index}abcd", "trainer"
    else:
        specs = child["spec"]["pytorchReplicaSpecs"]
        template = specs["Master" if replica == "master" else "Worker"]["template"]
        labels = {
            **template["metadata"]["labels"],
            "training.kubeflow.org/job-name": name,
            "training.kubeflow.org/replica-type": replica,
            "training.kubeflow.org/replica-index": str(index),
        }
        pod_name, container = f"{name}-{replica}-{index}", "pytorch"
    state: dict[str, Any]
    if exit_code is None:
        state = {"running": {"startedAt": iso(at)}}
    else:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Error" if exit_code else "Completed",
                "finishedAt": iso(at),
                "startedAt": iso(at),
            }
        }
        if message is not None:
            state["terminated"]["message"] = message
        phase = "Succeeded" if exit_code == 0 else "Failed"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": child["metadata"]["namespace"],
            "labels": labels,
        },
        "spec": copy.deepcopy(template["spec"]),
        "status": {"phase": phase, "containerStatuses": [{"name": container, "state": state}]},
    }


def result(stage: str, ok: bool = True, **fields: Any) -> str:
    """A stage's termination message (the stage contract's result JSON)."""
    return json.dumps({"stage": stage, "ok": ok, **fields}, sort_keys=True)


PREPROCESS_RESULT = {
    "key": "ab" * 32,
    "uri": "s3://out/cache/datasets/abab",
    "cacheHit": False,
    "trainTokens": 21140992,
    "validationTokens": 5283840,
    "rejected": {"emptyText": 12},
    "rowsRead": 1000,
    "accepted": 988,
}


def stage_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"].get(LABEL_STAGE, ""))


def run_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"].get(LABEL_RUN, ""))
