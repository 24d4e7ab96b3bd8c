"""Stages → Kubernetes objects (plain dicts) — pure.

Every pod meets Pod Security "restricted"; secrets reach pods only through secretKeyRef; user
strings never reach an argv or a shell (they travel in the stage config JSON, mounted from a
ConfigMap). Child names are deterministic, so creating them is idempotent.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubetrain_operator.api import API_GROUP, TrainingRun
from kubetrain_operator.plan import (
    CONFIG_DIR,
    METRICS_PORT,
    PVC_MOUNT_ROOT,
    Plan,
    Stage,
    stage_config_json,
)

DEFAULT_IMAGE = "ghcr.io/kubetrain/trainer:0.1.0"
LABEL_RUN = f"{API_GROUP}/run"
LABEL_STAGE = f"{API_GROUP}/stage"
LABEL_METRICS = f"{API_GROUP}/metrics"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKDIR = "/workspace"
#: Kubernetes label values and pod hostnames stop at 63 characters.
MAX_CHILD_NAME = 63
#: Room for the training operator's `-worker-N` pod suffix on PyTorchJob names: nodes ≤ 1024,
#: so the highest Worker index is 1022 (four digits).
PYTORCHJOB_SUFFIX_ROOM = len("-worker-0000")
UID = 1000


def child_name(run: str, suffix: str, limit: int = MAX_CHILD_NAME) -> str:
    """`<run>-<suffix>`, shortened with a hash of the run name when it would exceed `limit`."""
    name = f"{run}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(run.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{run[:keep].rstrip('-')}-{digest}-{suffix}"


def stage_object_name(plan: Plan, stage: Stage, attempt: int = 1) -> str:
    """The child's name: preprocess carries its key, training its attempt."""
    if stage.name == "preprocess":
        return child_name(plan.run, f"preprocess-{plan.preprocess_key[:8]}")
    if stage.name == "train":
        return child_name(plan.run, f"train-{attempt}", MAX_CHILD_NAME - PYTORCHJOB_SUFFIX_ROOM)
    if stage.name == "sanity":
        return child_name(plan.run, "sanity", MAX_CHILD_NAME - PYTORCHJOB_SUFFIX_ROOM)
    return child_name(plan.run, stage.name)


def config_map_name(plan: Plan) -> str:
    return child_name(plan.run, "config")


def metrics_service_name(plan: Plan) -> str:
    return child_name(plan.run, "metrics")


def render_all(
    run: TrainingRun, plan: Plan, *, namespace: str, image: str = DEFAULT_IMAGE, attempt: int = 1
) -> list[dict[str, Any]]:
    """Every object of every stage, in creation order."""
    objects = [render_config_map(run, plan, namespace), render_metrics_service(plan, namespace)]
    objects += [
        render_stage(run, plan, stage, namespace=namespace, image=image, attempt=attempt)
        for stage in plan.stages
    ]
    return objects


def render_stage(
    run: TrainingRun,
    plan: Plan,
    stage: Stage,
    *,
    namespace: str,
    image: str = DEFAULT_IMAGE,
    attempt: int = 1,
) -> dict[str, Any]:
    """The Job or PyTorchJob that runs one stage."""
    if stage.distributed:
        return render_pytorchjob(
            run, plan, stage, namespace=namespace, image=image, attempt=attempt
        )
    return render_job(run, plan, stage, namespace=namespace, image=image)


def _labels(plan: Plan, stage: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "kubetrain",
        "app.kubernetes.io/managed-by": "kubetrain-operator",
        LABEL_RUN: plan.run,
    }
    if stage is not None:
        labels[LABEL_STAGE] = stage
    return labels


def _metadata(
    name: str, namespace: str, labels: dict[str, str], run: TrainingRun | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if run is not None and run.spec.queue_name:
        meta["labels"] = {**labels, QUEUE_LABEL: run.spec.queue_name}
    return meta


def render_config_map(run: TrainingRun, plan: Plan, namespace: str) -> dict[str, Any]:
    """The stage configs, one JSON file per stage, mounted read-only at /etc/kubetrain."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(plan), namespace, _labels(plan)),
        "data": {f"{s.name}.json": stage_config_json(s) for s in plan.stages},
    }


def render_metrics_service(plan: Plan, namespace: str) -> dict[str, Any]:
    """Selects whichever stage pod exports metrics (rank 0 / the Job's pod) on :9400."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(metrics_service_name(plan), namespace, _labels(plan)),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_RUN: plan.run, LABEL_METRICS: "true"},
            "ports": [
                {
                    "name": "metrics",
                    "port": METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_job(
    run: TrainingRun, plan: Plan, stage: Stage, *, namespace: str, image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    """A batch/v1 Job for preprocess and merge: one pod, no retries (the operator decides)."""
    command = ["python", *stage.trainer_args(f"{CONFIG_DIR}/{stage.name}.json", WORKDIR)]
    labels = _labels(plan, stage.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(stage_object_name(plan, stage), namespace, labels, run),
        "spec": {
            "backoffLimit": 0,
            # Exit 2/3 are final by contract; the operator owns retries of anything else.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "In",
                            "values": [2, 3],
                        },
                    }
                ]
            },
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "suspend": run.spec.suspend,
            "template": _pod_template(
                run, plan, stage, {**labels, LABEL_METRICS: "true"}, "trainer", command, image
            ),
        },
    }


def render_pytorchjob(
    run: TrainingRun,
    plan: Plan,
    stage: Stage,
    *,
    namespace: str,
    image: str = DEFAULT_IMAGE,
    attempt: int = 1,
) -> dict[str, Any]:
    """A Kubeflow v1 PyTorchJob: one Master plus nodes-1 Workers, torchrun in each pod.

    torchrun takes node rank and rendezvous address from the PET_* variables the training
    operator injects; only the shape (nodes × processes) is on the command line.
    """
    command = [
        "torchrun",
        f"--nnodes={stage.nodes}",
        f"--nproc-per-node={stage.procs_per_node}",
        *stage.trainer_args(f"{CONFIG_DIR}/{stage.name}.json", WORKDIR),
    ]
    labels = _labels(plan, stage.name)
    replicas: dict[str, Any] = {
        "Master": {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": _pod_template(
                run, plan, stage, {**labels, LABEL_METRICS: "true"}, "pytorch", command, image
            ),
        }
    }
    if stage.nodes > 1:
        replicas["Worker"] = {
            "replicas": stage.nodes - 1,
            "restartPolicy": "Never",
            "template": _pod_template(run, plan, stage, labels, "pytorch", command, image),
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(stage_object_name(plan, stage, attempt), namespace, labels, run),
        "spec": {
            "nprocPerNode": str(stage.procs_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {
                "backoffLimit": 0,  # a failed attempt is replaced by the operator (new attempt)
                "cleanPodPolicy": "None",  # keep finished pods for their logs
                "suspend": run.spec.suspend,
            },
        },
    }


def _pod_template(
    run: TrainingRun,
    plan: Plan,
    stage: Stage,
    labels: dict[str, str],
    container_name: str,
    command: list[str],
    image: str,
) -> dict[str, Any]:
    spec = run.spec
    res = spec.resources
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (an emptyDir, the root fs is read-only)
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 (a Memory emptyDir for NCCL)
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(plan)}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # NCCL and data loaders need far more than the container runtime's 64M /dev/shm.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shared_memory}},
    ]
    for index, claim in enumerate(plan.pvc_claims):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{index}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"})
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    if stage.gpus_per_node:
        resources["limits"][res.gpu_resource] = str(stage.gpus_per_node)
        resources["requests"][res.gpu_resource] = str(stage.gpus_per_node)
    for key, value in (("cpu", res.cpu), ("memory", res.memory)):
        if value is not None:
            resources["requests"][key] = value
            resources["limits"][key] = value
    container: dict[str, Any] = {
        "name": container_name,
        "image": spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "workingDir": WORKDIR,
        "env": _env(run),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": {k: v for k, v in resources.items() if v},
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 300,  # time to write the SIGTERM checkpoint
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(res.node_selector.items()))
    if res.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations
        ]
    return {"metadata": {"labels": labels}, "spec": pod_spec}


def _env(run: TrainingRun) -> list[dict[str, Any]]:
    """Environment of every stage pod: caches on the emptyDir, credentials by reference only."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": WORKDIR},
        {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{WORKDIR}/.cache/torch_extensions"},
        {"name": "TRITON_CACHE_DIR", "value": f"{WORKDIR}/.cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KUBETRAIN_LOG_FORMAT", "value": "json"},
        # Nothing is ever fetched from the Hugging Face Hub (plan refuses hf:// URIs).
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    s3 = run.spec.storage.s3
    if s3.secret_name:
        env += [
            {
                "name": "AWS_ACCESS_KEY_ID",
                "valueFrom": {
                    "secretKeyRef": {"name": s3.secret_name, "key": s3.access_key_id_key}
                },
            },
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {
                    "secretKeyRef": {"name": s3.secret_name, "key": s3.secret_access_key_key}
                },
            },
        ]
    return env
