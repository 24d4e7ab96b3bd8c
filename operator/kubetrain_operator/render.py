"""Planned stages → Kubernetes objects (plain dicts) — pure.

render only consumes the plan: each stage's kind, shape, resources, env, metrics port and config
come from `plan.Stage`; nothing is read from the run's spec here. Every pod meets Pod Security
"restricted"; secrets reach pods only through secretKeyRef; user strings never reach an argv or a
shell (they travel in the stage config JSON, mounted from a ConfigMap). Child names are
deterministic (`<run>-preprocess-<key8>`, `<run>-sanity-<i>`, `<run>-train-<attempt>`,
`<run>-merge`), so creating them is idempotent. `metadata.namespace` is set only when a namespace
is given. Every object carries `kubetrain.dev/run`, `kubetrain.dev/stage` (stage objects) and the
recommended `app.kubernetes.io/*` labels; the trainer ServiceAccount, shared by the namespace's
runs, carries no run label. Image, ServiceAccount and pull secrets are the plan's (spec first,
then the cluster's defaults).
"""

from __future__ import annotations

import hashlib
from typing import Any

from kubetrain_contract import layout
from kubetrain_operator import __version__
from kubetrain_operator.api import API_GROUP, TrainingRun
from kubetrain_operator.plan import (
    CONFIG_DIR,
    WORKDIR,
    Plan,
    Stage,
    stage_config_json,
)

LABEL_RUN = f"{API_GROUP}/run"
LABEL_STAGE = f"{API_GROUP}/stage"
LABEL_METRICS = f"{API_GROUP}/metrics"
#: The stage's role (plan.StageRole) on its objects and pods: what the operator scrapes by.
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_SUMMARY = f"{API_GROUP}/summary"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
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
    """The child's name: preprocess carries its key, training its attempt, a rung its index."""
    if stage.role == "preprocess":
        return child_name(plan.run, f"preprocess-{plan.preprocess_key[:8]}")
    if stage.role == "train":
        return child_name(plan.run, f"train-{attempt}", MAX_CHILD_NAME - PYTORCHJOB_SUFFIX_ROOM)
    if stage.distributed:
        return child_name(plan.run, stage.name, MAX_CHILD_NAME - PYTORCHJOB_SUFFIX_ROOM)
    return child_name(plan.run, stage.name)


def config_map_name(plan: Plan) -> str:
    return child_name(plan.run, "config")


def metrics_service_name(plan: Plan) -> str:
    return child_name(plan.run, "metrics")


def render_all(
    run: TrainingRun, plan: Plan, namespace: str | None = None, *, attempt: int = 1
) -> list[dict[str, Any]]:
    """Every object of every stage, in creation order (what `kubetrain render` prints)."""
    objects = render_shared(plan, namespace)
    for stage in plan.stages:
        objects += render_stage(run, plan, stage, attempt, namespace)
    return objects


def render_shared(plan: Plan, namespace: str | None = None) -> list[dict[str, Any]]:
    """What every stage needs first: the trainer ServiceAccount (when the cluster names one), the
    stage configs and the metrics Service."""
    objects = [render_config_map(plan, namespace), render_metrics_service(plan, namespace)]
    if plan.service_account:
        objects.insert(0, render_trainer_service_account(plan.service_account, namespace))
    return objects


def render_stage(
    run: TrainingRun,
    plan: Plan,
    stage: Stage,
    attempt: int = 1,
    namespace: str | None = None,
) -> list[dict[str, Any]]:
    """The objects that run one stage: its Job or PyTorchJob.

    `run` is accepted for the operator's owner references to come; everything rendered comes
    from the plan.
    """
    del run  # the plan is final: nothing is read from the spec here
    if stage.distributed:
        return [render_pytorchjob(plan, stage, attempt, namespace)]
    return [render_job(plan, stage, namespace)]


def _labels(plan: Plan, component: str, stage: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "kubetrain",
        "app.kubernetes.io/instance": plan.run,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/part-of": "kubetrain",
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": "kubetrain-operator",
        LABEL_RUN: plan.run,
    }
    if stage is not None:
        labels[LABEL_STAGE] = stage
    return labels


def _metadata(
    name: str,
    namespace: str | None,
    labels: dict[str, str],
    plan: Plan | None = None,
    summary: str | None = None,
) -> dict[str, Any]:
    """metadata.namespace only when one is given, so `kubectl apply -n NS -f -` works."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    if plan is not None and plan.queue_name:
        meta["labels"][QUEUE_LABEL] = plan.queue_name
    if summary:
        meta["annotations"] = {ANNOTATION_SUMMARY: summary}
    return meta


def render_trainer_service_account(name: str, namespace: str | None = None) -> dict[str, Any]:
    """The account every stage pod runs as: no Role binds it and no pod mounts its token. Shared
    by the namespace's runs, so it has no owner (deleting a run leaves it for the others)."""
    labels = {
        "app.kubernetes.io/name": "kubetrain",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "kubetrain",
        "app.kubernetes.io/managed-by": "kubetrain-operator",
    }
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(name, namespace, labels),
        "automountServiceAccountToken": False,
    }


def render_config_map(plan: Plan, namespace: str | None = None) -> dict[str, Any]:
    """The stage configs, one JSON file per stage, mounted read-only at /etc/kubetrain."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config_map_name(plan), namespace, _labels(plan, "config")),
        "data": {s.config_file: stage_config_json(s) for s in plan.stages},
    }


def render_metrics_service(plan: Plan, namespace: str | None = None) -> dict[str, Any]:
    """Selects whichever stage pod exports metrics (rank 0 / the Job's pod), by port name."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(metrics_service_name(plan), namespace, _labels(plan, "metrics")),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_RUN: plan.run, LABEL_METRICS: "true"},
            "ports": [
                {
                    "name": "metrics",
                    "port": plan.stages[0].metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_job(plan: Plan, stage: Stage, namespace: str | None = None) -> dict[str, Any]:
    """A batch/v1 Job for preprocess and merge: one pod, no retries (the operator decides)."""
    command = ["python", *stage.trainer_args(f"{CONFIG_DIR}/{stage.config_file}", WORKDIR)]
    labels = _labels(plan, stage.role, stage.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(
            stage_object_name(plan, stage), namespace, labels, plan, stage.summary
        ),
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
            **({"activeDeadlineSeconds": stage.deadline_seconds} if stage.deadline_seconds else {}),
            "suspend": plan.suspend,
            "template": _pod_template(
                plan, stage, {**labels, LABEL_METRICS: "true"}, "trainer", command
            ),
        },
    }


def render_pytorchjob(
    plan: Plan,
    stage: Stage,
    attempt: int = 1,
    namespace: str | None = None,
) -> dict[str, Any]:
    """A Kubeflow v1 PyTorchJob: one Master plus nodes-1 Workers, torchrun in each pod.

    torchrun takes node rank and rendezvous address from the PET_* variables the training
    operator injects; only the shape (nodes × processes) is on the command line.
    """
    command = [
        "torchrun",
        f"--nnodes={stage.nodes}",
        f"--nproc-per-node={stage.procs_per_node}",
        *stage.trainer_args(f"{CONFIG_DIR}/{stage.config_file}", WORKDIR),
    ]
    labels = _labels(plan, stage.role, stage.name)
    extra_env = [{"name": layout.ATTEMPT_ENV, "value": str(attempt)}]
    replicas: dict[str, Any] = {
        "Master": {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": _pod_template(
                plan,
                stage,
                {**labels, LABEL_METRICS: "true"},
                "pytorch",
                command,
                extra_env,
            ),
        }
    }
    if stage.nodes > 1:
        replicas["Worker"] = {
            "replicas": stage.nodes - 1,
            "restartPolicy": "Never",
            "template": _pod_template(plan, stage, labels, "pytorch", command, extra_env),
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(
            stage_object_name(plan, stage, attempt), namespace, labels, plan, stage.summary
        ),
        "spec": {
            "nprocPerNode": str(stage.procs_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {
                "backoffLimit": 0,  # a failed attempt is replaced by the operator (new attempt)
                "cleanPodPolicy": "None",  # keep finished pods for their logs
                "suspend": plan.suspend,
            },
        },
    }


def _pod_template(
    plan: Plan,
    stage: Stage,
    labels: dict[str, str],
    container_name: str,
    command: list[str],
    extra_env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (an emptyDir, the root fs is read-only)
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(plan)}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if stage.distributed:
        # NCCL and data loaders need far more than the container runtime's 64M /dev/shm.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})  # noqa: S108 (Memory emptyDir)
        volumes.append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": plan.shared_memory}}
        )
    for index, claim in enumerate(plan.pvc_claims):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{index}", "mountPath": f"{layout.PVC_MOUNT_ROOT}/{claim}"})
    container: dict[str, Any] = {
        "name": container_name,
        "image": plan.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "workingDir": WORKDIR,
        "env": [dict(e) for e in stage.env] + list(extra_env or []),
        "ports": [{"name": "metrics", "containerPort": stage.metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if stage.resources:
        container["resources"] = {k: dict(v) for k, v in stage.resources.items()}
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
    if plan.service_account:
        pod_spec["serviceAccountName"] = plan.service_account
    if plan.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in plan.image_pull_secrets]
    if plan.node_selector and (stage.distributed or stage.gpus_per_node):
        pod_spec["nodeSelector"] = dict(plan.node_selector)
    if plan.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in plan.tolerations]
    return {"metadata": {"labels": labels}, "spec": pod_spec}
