"""The controllers that turn workloads into pods: the Job controller and the Kubeflow training
operator (PyTorchJob v1), as far as kubetrain's children use them. The project's one emulation
of them: the stand-in's reconciler (`Controllers`, run by the pod runner) writes its pods and
conditions through the pure functions at the top (`pod_for`, `pod_status`, `condition`,
`job_status`), and the tests that play these controllers by hand (the operator harness, the pure
status tests' world) write the same objects with the same functions.

Job (batch/v1): one pod at a time (`parallelism`/`completions` 1, as our Jobs are), named
`<job>-<5 chars>`, labelled `batch.kubernetes.io/job-name`/`controller-uid`, owned by the Job.
Status: `active`/`ready`/`succeeded`/`failed`, `startTime`, `completionTime`, conditions (with
lastProbeTime and lastTransitionTime) `SuccessCriteriaMet` + `Complete`, or `FailureTarget` +
`Failed` (reason `PodFailurePolicy` for a FailJob rule on exit codes, `BackoffLimitExceeded` past
`backoffLimit`), `Suspended`.

PyTorchJob (kubeflow.org/v1, training operator v1.9): the defaulting webhook (`cleanPodPolicy`
None, `replicas` 1, `restartPolicy` OnFailure, the `pytorchjob-port` 23456 on container
`pytorch`, `nprocPerNode` auto); per replica a headless Service and a pod `<job>-<type>-<i>` with
Kubeflow's labels (`training.kubeflow.org/job-name`, `replica-type`, `replica-index`,
`operator-name`, `job-role: master`) and the env it injects (`MASTER_ADDR` = `<job>-master-0`,
`MASTER_PORT`, `PET_MASTER_*`, `WORLD_SIZE` = replicas × nprocPerNode, `RANK` = `PET_NODE_RANK`
= the node's index, Master 0, `PET_NNODES`, `PET_NPROC_PER_NODE`, `PYTHONUNBUFFERED`).
Conditions Created, Running, Succeeded, Failed, Suspended with Kubeflow's reasons and
lastUpdateTime; Succeeded when the Master succeeds (replicas still active then count as
succeeded), Failed when a replica fails and may not be restarted; `replicaStatuses` per type;
`runPolicy.suspend` deletes the pods and resuming recreates them.
Not emulated: elastic policy, gang scheduling, `ExitCode` restart policy, `activeDeadlineSeconds`,
`ttlSecondsAfterFinished`, Jobs with parallelism > 1 or indexed completions.
"""

from __future__ import annotations

import copy
import random
import time
from datetime import UTC, datetime
from typing import Any

from .apiserver import Obj, StandInAPIServer, now_iso

KUBEFLOW = "training.kubeflow.org"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456
OPERATOR_NAME = "pytorchjob-controller"
POD_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's generateName alphabet

# The reason and message each controller writes with a condition; `{name}` is the workload's name.
JOB_REASONS = {
    "SuccessCriteriaMet": ("CompletionsReached", "Reached expected number of succeeded pods"),
    "Complete": ("CompletionsReached", "Reached expected number of succeeded pods"),
    "FailureTarget": ("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
    "Failed": ("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
    "Suspended": ("JobSuspended", "Job suspended"),
    "Resumed": ("JobResumed", "Job resumed"),
}
PYTORCHJOB_REASONS = {
    "Created": ("PyTorchJobCreated", "PyTorchJob {name} is created."),
    "Running": ("PyTorchJobRunning", "PyTorchJob {name} is running."),
    "Succeeded": ("PyTorchJobSucceeded", "PyTorchJob {namespace}/{name} successfully completed."),
    "Failed": (
        "PyTorchJobFailed",
        "PyTorchJob {name} is failed because 1 Master replica(s) failed.",
    ),
    "Suspended": ("PyTorchJobSuspended", "PyTorchJob {name} is suspended."),
    "Resumed": ("PyTorchJobResumed", "PyTorchJob {name} is resumed."),
}
#: The conditions (all True) each controller shows in a settled state of its workload.
SETTLED = {
    "Job": {
        "running": [],
        "succeeded": ["SuccessCriteriaMet", "Complete"],
        "failed": ["FailureTarget", "Failed"],
        "suspended": ["Suspended"],
    },
    "PyTorchJob": {
        "running": ["Created", "Running"],
        "succeeded": ["Created", "Succeeded"],
        "failed": ["Created", "Failed"],
        "suspended": ["Created", "Suspended"],
    },
}


# ------------------------------------------------------- what the controllers write (pure)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str,
    at: float,
    status: str = "True",
    message: str | None = None,
    *,
    reason: str | None = None,
    kind: str = "PyTorchJob",
    name: str = "",
    namespace: str = "",
) -> Obj:
    """One condition as `kind`'s controller writes it: its reason and (unless given) message;
    Kubeflow stamps lastUpdateTime too, the Job controller lastProbeTime."""
    reasons = JOB_REASONS if kind == "Job" else PYTORCHJOB_REASONS
    key = "Resumed" if (type_, status) == ("Suspended", "False") else type_
    default_reason, default = reasons.get(key, (type_, ""))
    stamp = iso(at)
    entry: Obj = {
        "type": type_,
        "status": status,
        "reason": default_reason if reason is None else reason,
        "message": default.format(name=name, namespace=namespace) if message is None else message,
        "lastTransitionTime": stamp,
    }
    entry["lastUpdateTime" if kind != "Job" else "lastProbeTime"] = stamp
    return entry


def job_status(kind: str, state: str, at: float, name: str = "", namespace: str = "") -> Obj:
    """The status a Job (`kind` Job) or PyTorchJob controller shows once its workload is
    running, succeeded, failed or suspended."""
    status: Obj = {
        "conditions": [
            condition(t, at, kind=kind, name=name, namespace=namespace)
            for t in SETTLED[kind][state]
        ]
    }
    if state != "suspended":
        status["startTime"] = iso(at)
    if state == "succeeded" or (state == "failed" and kind == "PyTorchJob"):
        status["completionTime"] = iso(at)
    if kind == "Job" and state == "running":
        status["active"] = 1
    return status


def owner_reference(obj: Obj) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_for(
    child: Obj,
    *,
    index: int = 0,
    replica: str = "master",
    phase: str = "Running",
    exit_code: int | None = None,
    message: str | None = None,
    at: float = 0.0,
) -> Obj:
    """The pod `child`'s controller creates (a Job's one pod, or a PyTorchJob's `replica`
    `index`): name, labels, env, hostname and owner as the controller writes them, with the
    status a kubelet then reports (`phase`, or terminated with `exit_code` and `message`).
    The owner reference and controller-uid need the child's uid (an object from the API)."""
    meta = child["metadata"]
    name, uid = meta["name"], meta.get("uid")
    labels: dict[str, str]
    env: list[Obj] = []
    if child["kind"] == "Job":
        template = child["spec"].get("template") or {}
        labels = {"batch.kubernetes.io/job-name": name, "job-name": name}
        if uid:
            labels |= {"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}
        pod_name, hostname = f"{name}-{''.join(random.choices(POD_SUFFIX_CHARS, k=5))}", None
    else:
        spec = child["spec"]
        replicas = spec.get("pytorchReplicaSpecs") or {}
        rtype = replica[:1].upper() + replica[1:]
        template = (replicas.get(rtype) or {}).get("template") or {}
        pod_name = hostname = f"{name}-{replica}-{index}"
        labels = {
            f"{KUBEFLOW}/job-name": name,
            f"{KUBEFLOW}/operator-name": OPERATOR_NAME,
            f"{KUBEFLOW}/replica-type": replica,
            f"{KUBEFLOW}/replica-index": str(index),
        }
        if rtype == "Master":
            labels[f"{KUBEFLOW}/job-role"] = "master"
        env = _pytorch_env(spec, name, rtype, index)
    pod_spec = copy.deepcopy(template.get("spec") or {})
    for container in pod_spec.get("containers") or []:
        if env:
            container["env"] = [*(container.get("env") or []), *env]
    if hostname:
        pod_spec["hostname"] = hostname
    template_meta = template.get("metadata") or {}
    metadata: Obj = {
        "name": pod_name,
        "namespace": meta.get("namespace"),
        "labels": {**(template_meta.get("labels") or {}), **labels},
        "annotations": dict(template_meta.get("annotations") or {}),
    }
    if uid:
        metadata["ownerReferences"] = [owner_reference(child)]
    containers = pod_spec.get("containers") or [{"name": "main"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": pod_spec,
        "status": pod_status(containers[0]["name"], phase, exit_code, message, at),
    }


def pod_status(
    container: str, phase: str, exit_code: int | None, message: str | None, at: float
) -> Obj:
    """What the kubelet reports: the container running, or terminated with `exit_code`
    (`message` from the termination log)."""
    state: Obj
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
    return {"phase": phase, "containerStatuses": [{"name": container, "state": state}]}


def _pytorch_env(spec: Obj, name: str, rtype: str, index: int) -> list[Obj]:
    """The env the training operator injects into a replica's pods."""
    replicas = spec.get("pytorchReplicaSpecs") or {}
    total = sum(int(r.get("replicas", 1)) for r in replicas.values())
    nproc = str(spec.get("nprocPerNode", "auto"))
    world = total * (int(nproc) if nproc.isdigit() else 1)
    env: list[Obj] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if "Master" in replicas:
        port = str(_port(replicas["Master"]))
        rank = str(index + 1 if rtype == "Worker" else index)
        addr = f"{name}-master-0"
        env += [
            {"name": "MASTER_PORT", "value": port},
            {"name": "PET_MASTER_PORT", "value": port},
            {"name": "MASTER_ADDR", "value": addr},
            {"name": "PET_MASTER_ADDR", "value": addr},
            {"name": "WORLD_SIZE", "value": str(world)},
            {"name": "RANK", "value": rank},
            {"name": "PET_NODE_RANK", "value": rank},
        ]
    return [
        *env,
        {"name": "PET_NPROC_PER_NODE", "value": nproc},
        {"name": "PET_NNODES", "value": str(total)},
    ]


# ------------------------------------------------------------------------- the reconciler


def _owned(objs: list[Obj], owner: Obj) -> list[Obj]:
    uid = owner["metadata"]["uid"]
    return [
        o
        for o in objs
        if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])
    ]


def _phase(pod: Obj) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def _exit_code(pod: Obj) -> int | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = cs.get("state", {}).get("terminated")
        if term is not None:
            return int(term.get("exitCode", 0))
    return None


def _set_condition(conditions: list[Obj], entry: Obj, *, update_time: bool = False) -> bool:
    """Set `entry`'s condition type to its status, reason and message; True when something
    changed."""
    stamp = now_iso()
    for cond in conditions:
        if cond["type"] == entry["type"]:
            new = (entry["status"], entry["reason"], entry["message"])
            if (cond["status"], cond.get("reason"), cond.get("message")) == new:
                return False
            if cond["status"] != entry["status"]:
                cond["lastTransitionTime"] = stamp
            cond.update(status=entry["status"], reason=entry["reason"], message=entry["message"])
            if update_time:
                cond["lastUpdateTime"] = stamp
            return True
    conditions.append(entry)
    return True


def _true(conditions: list[Obj], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in conditions)


class Controllers:
    def __init__(self, server: StandInAPIServer) -> None:
        self.server = server

    def install(self) -> None:
        self.server.hooks.mutators.setdefault(("kubeflow.org", "pytorchjobs"), []).append(
            default_pytorchjob
        )

    async def reconcile(self) -> None:
        pods = self.server.objects("", "pods")
        for job in self.server.objects("batch", "jobs"):
            await self._job(job, _owned(pods, job))
        for job in self.server.objects("kubeflow.org", "pytorchjobs"):
            await self._pytorchjob(job, _owned(pods, job))

    async def _status(self, group: str, plural: str, obj: Obj, status: Obj) -> None:
        if status == obj.get("status"):
            return
        meta = obj["metadata"]
        try:
            await self.server.write(
                "update",
                group,
                plural,
                meta["namespace"],
                {**obj, "status": status},
                name=meta["name"],
                sub="status",
            )
        except Exception:
            return

    async def _create_pod(self, owner: Obj, **replica: Any) -> None:
        pod = pod_for(owner, **replica)
        del pod["status"]  # the kubelet's to write
        try:
            await self.server.write("create", "", "pods", owner["metadata"]["namespace"], pod)
        except Exception:
            return

    async def _delete_pods(self, pods: list[Obj]) -> None:
        for pod in pods:
            if not pod["metadata"].get("deletionTimestamp"):
                try:
                    await self.server.write(
                        "delete",
                        "",
                        "pods",
                        pod["metadata"]["namespace"],
                        {},
                        name=pod["metadata"]["name"],
                    )
                except Exception:
                    continue

    # ------------------------------------------------------------------------------- Jobs

    async def _job(self, job: Obj, pods: list[Obj]) -> None:
        if job["metadata"].get("deletionTimestamp"):
            return
        spec, status = job.get("spec", {}), copy.deepcopy(job.get("status") or {})
        conditions = status.setdefault("conditions", [])
        if _true(conditions, "Complete") or _true(conditions, "Failed"):
            return
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        active = [p for p in live if _phase(p) in ("Pending", "Running")]
        succeeded = [p for p in pods if _phase(p) == "Succeeded"]
        failed = [p for p in pods if _phase(p) == "Failed"]
        if spec.get("suspend"):
            await self._delete_pods(active)
            _set_condition(conditions, condition("Suspended", time.time(), kind="Job"))
            status.pop("startTime", None)
        else:
            if _true(conditions, "Suspended"):
                _set_condition(conditions, condition("Suspended", time.time(), "False", kind="Job"))
            status.setdefault("startTime", now_iso())
            verdict = self._job_verdict(spec, failed, succeeded)
            if verdict is not None:
                reason, message, kind = verdict
                target = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
                _set_condition(
                    conditions,
                    condition(target, time.time(), "True", message, reason=reason, kind="Job"),
                )
                if not active:
                    _set_condition(
                        conditions,
                        condition(kind, time.time(), "True", message, reason=reason, kind="Job"),
                    )
                    if kind == "Complete":
                        status["completionTime"] = now_iso()
                else:
                    await self._delete_pods(active)
            elif not active:
                await self._create_pod(job)
        status["active"] = len(active)
        status["ready"] = sum(1 for p in active if _phase(p) == "Running")
        status["succeeded"] = len(succeeded)
        status["failed"] = len(failed)
        status["terminating"] = sum(1 for p in pods if p["metadata"].get("deletionTimestamp"))
        for key in ("active", "succeeded", "failed", "terminating"):
            if not status[key]:
                status.pop(key)
        if not conditions:
            status.pop("conditions")
        await self._status("batch", "jobs", job, status)

    def _job_verdict(
        self, spec: Obj, failed: list[Obj], succeeded: list[Obj]
    ) -> tuple[str, str, str] | None:
        if len(succeeded) >= int(spec.get("completions", 1)):
            return "CompletionsReached", "Reached expected number of succeeded pods", "Complete"
        for pod in failed:
            code = _exit_code(pod)
            rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
            for index, rule in enumerate(rules):
                codes = rule.get("onExitCodes")
                if not codes or code is None:
                    continue
                hit = code in codes.get("values", [])
                if codes.get("operator") == "NotIn":
                    hit = not hit
                if hit and rule.get("action") == "FailJob":
                    container = codes.get("containerName") or "the container"
                    return (
                        "PodFailurePolicy",
                        f"Container {container} for pod {pod['metadata']['namespace']}/"
                        f"{pod['metadata']['name']} failed with exit code {code} matching "
                        f"FailJob rule at index {index}",
                        "Failed",
                    )
        if len(failed) > int(spec.get("backoffLimit", 6)):
            return "BackoffLimitExceeded", "Job has reached the specified backoff limit", "Failed"
        return None

    # ------------------------------------------------------------------------ PyTorchJobs

    async def _pytorchjob(self, job: Obj, pods: list[Obj]) -> None:
        if job["metadata"].get("deletionTimestamp"):
            return
        meta, spec = job["metadata"], job.get("spec", {})
        name, ns = meta["name"], meta["namespace"]
        status = copy.deepcopy(job.get("status") or {})
        conditions = status.setdefault("conditions", [])
        replicas = spec.get("pytorchReplicaSpecs") or {}
        finished = _true(conditions, "Succeeded") or _true(conditions, "Failed")

        def settle(type_: str, status: str = "True", **given: str) -> None:
            entry = condition(type_, time.time(), status, name=name, namespace=ns, **given)
            _set_condition(conditions, entry, update_time=True)

        if not conditions:
            settle("Created")
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if finished:
            if _true(conditions, "Succeeded"):
                # as Kubeflow's ReconcileJobs does once a job has succeeded: replicas still
                # active (a worker that outlived the master) count as succeeded
                for counts in (status.get("replicaStatuses") or {}).values():
                    if counts.get("active"):
                        counts["succeeded"] = counts.get("succeeded", 0) + counts.pop("active")
            policy = (spec.get("runPolicy") or {}).get("cleanPodPolicy", "None")
            if policy in ("All", "Running"):
                await self._delete_pods(
                    [p for p in live if policy == "All" or _phase(p) in ("Pending", "Running")]
                )
            await self._status("kubeflow.org", "pytorchjobs", job, status)
            return
        if (spec.get("runPolicy") or {}).get("suspend"):
            await self._delete_pods(live)
            settle("Suspended")
            reason, message = PYTORCHJOB_REASONS["Suspended"]
            settle("Running", "False", reason=reason, message=message.format(name=name))
            status.pop("startTime", None)
            status["replicaStatuses"] = {rtype: {} for rtype in replicas}
            await self._status("kubeflow.org", "pytorchjobs", job, status)
            return
        if _true(conditions, "Suspended"):
            settle("Suspended", "False")
        status.setdefault("startTime", now_iso())
        master_port = _port(replicas.get("Master") or {})
        by_name = {p["metadata"]["name"]: p for p in pods}
        replica_statuses: dict[str, Obj] = {}
        failed_types: list[tuple[str, int]] = []
        for rtype, rspec in replicas.items():
            lower = rtype.lower()
            counts = {"active": 0, "succeeded": 0, "failed": 0}
            for index in range(int(rspec.get("replicas", 1))):
                pod_name = f"{name}-{lower}-{index}"
                await self._ensure_service(job, pod_name, lower, index, master_port)
                pod = by_name.get(pod_name)
                if pod is None:
                    await self._create_pod(job, replica=lower, index=index)
                    counts["active"] += 1
                    continue
                phase = _phase(pod)
                if phase == "Succeeded":
                    counts["succeeded"] += 1
                elif phase == "Failed":
                    counts["failed"] += 1
                elif not pod["metadata"].get("deletionTimestamp"):
                    counts["active"] += 1
            selector = (
                f"{KUBEFLOW}/job-name={name},{KUBEFLOW}/operator-name={OPERATOR_NAME},"
                f"{KUBEFLOW}/replica-type={lower}"
            )
            replica_statuses[rtype] = {
                **{k: v for k, v in counts.items() if v},
                "selector": selector,
            }
            if counts["failed"]:
                failed_types.append((rtype, counts["failed"]))
        status["replicaStatuses"] = replica_statuses
        master = replica_statuses.get("Master", {})
        if failed_types:
            rtype, count = failed_types[0]
            message = f"PyTorchJob {name} is failed because {count} {rtype} replica(s) failed."
            reason = PYTORCHJOB_REASONS["Failed"][0]
            settle("Running", "False", reason=reason, message=message)
            settle("Failed", message=message)
            status["completionTime"] = now_iso()
        elif master.get("succeeded") or (
            "Master" not in replicas
            and all(
                r.get("succeeded") == int(replicas[t].get("replicas", 1))
                for t, r in replica_statuses.items()
            )
        ):
            reason, message = PYTORCHJOB_REASONS["Succeeded"]
            message = message.format(name=name, namespace=ns)
            settle("Running", "False", reason=reason, message=message)
            settle("Succeeded")
            status["completionTime"] = now_iso()
        elif any(
            _phase(p) == "Running"
            for p in pods
            if (p["metadata"].get("labels") or {}).get(f"{KUBEFLOW}/replica-type")
            == ("master" if "Master" in replicas else "worker")
        ):
            settle("Running")
        await self._status("kubeflow.org", "pytorchjobs", job, status)

    async def _ensure_service(self, job: Obj, name: str, rtype: str, index: int, port: int) -> None:
        if self.server.get("", "services", job["metadata"]["namespace"], name) is not None:
            return
        labels = {
            f"{KUBEFLOW}/job-name": job["metadata"]["name"],
            f"{KUBEFLOW}/operator-name": OPERATOR_NAME,
            f"{KUBEFLOW}/replica-type": rtype,
            f"{KUBEFLOW}/replica-index": str(index),
        }
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": job["metadata"]["namespace"],
                "labels": labels,
                "ownerReferences": [owner_reference(job)],
            },
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [{"name": PORT_NAME, "port": port, "targetPort": port}],
            },
        }
        try:
            await self.server.write("create", "", "services", job["metadata"]["namespace"], service)
        except Exception:
            return


def _port(rspec: Obj) -> int:
    for container in (rspec.get("template") or {}).get("spec", {}).get("containers") or []:
        if container.get("name") == "pytorch":
            for port in container.get("ports") or []:
                if port.get("name") == PORT_NAME:
                    return int(port["containerPort"])
    return DEFAULT_PORT


def default_pytorchjob(job: Obj, old: Obj | None) -> None:
    """The training operator's defaulting webhook (SetDefaults_PyTorchJob, v1.9)."""
    spec = job.setdefault("spec", {})
    spec.setdefault("runPolicy", {}).setdefault("cleanPodPolicy", "None")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    for key in list(replicas):  # replica type names in CamelCase
        camel = key[:1].upper() + key[1:].lower()
        if camel in ("Master", "Worker") and camel != key:
            replicas[camel] = replicas.pop(key)
    for rspec in replicas.values():
        rspec.setdefault("replicas", 1)
        rspec.setdefault("restartPolicy", "OnFailure")
        for container in (rspec.get("template") or {}).get("spec", {}).get("containers") or []:
            if container.get("name") != "pytorch":
                continue
            ports = container.setdefault("ports", [])
            if not any(p.get("name") == PORT_NAME for p in ports):
                ports.append({"name": PORT_NAME, "containerPort": DEFAULT_PORT, "protocol": "TCP"})
    spec.setdefault("nprocPerNode", "auto")
