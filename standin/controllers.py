"""The controllers that turn workloads into pods: the Job controller and the Kubeflow training
operator (PyTorchJob v1), as far as kubetrain's children use them.

Job (batch/v1): one pod at a time (`parallelism`/`completions` 1, as our Jobs are), named
`<job>-<5 chars>`, labelled `batch.kubernetes.io/job-name`/`controller-uid`, owned by the Job.
Status: `active`/`ready`/`succeeded`/`failed`, `startTime`, `completionTime`, conditions
`SuccessCriteriaMet` + `Complete`, or `FailureTarget` + `Failed` (reason `PodFailurePolicy`
for a FailJob rule on exit codes, `BackoffLimitExceeded` past `backoffLimit`), `Suspended`.

PyTorchJob (kubeflow.org/v1, training operator v1.9): the defaulting webhook (`cleanPodPolicy`
None, `replicas` 1, `restartPolicy` OnFailure, the `pytorchjob-port` 23456 on container
`pytorch`, `nprocPerNode` auto); per replica a headless Service and a pod `<job>-<type>-<i>` with
Kubeflow's labels (`training.kubeflow.org/job-name`, `replica-type`, `replica-index`,
`operator-name`, `job-role: master`) and the env it injects (`MASTER_ADDR` = `<job>-master-0`,
`MASTER_PORT`, `PET_MASTER_*`, `WORLD_SIZE` = replicas × nprocPerNode, `RANK` = `PET_NODE_RANK`
= the node's index, Master 0, `PET_NNODES`, `PET_NPROC_PER_NODE`, `PYTHONUNBUFFERED`).
Conditions Created, Running, Succeeded, Failed, Suspended with Kubeflow's reasons; Succeeded
when the Master succeeds (replicas still active then count as succeeded), Failed when a
replica fails and may not be restarted; `replicaStatuses` per type; `runPolicy.suspend` deletes
the pods and resuming recreates them.
Not emulated: elastic policy, gang scheduling, `ExitCode` restart policy, `activeDeadlineSeconds`,
`ttlSecondsAfterFinished`, Jobs with parallelism > 1 or indexed completions.
"""

from __future__ import annotations

import copy
import random

from .apiserver import Obj, StandInAPIServer, now_iso

KUBEFLOW = "training.kubeflow.org"
PORT_NAME = "pytorchjob-port"
DEFAULT_PORT = 23456
OPERATOR_NAME = "pytorchjob-controller"


def _owner(obj: Obj) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


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


def _set_condition(
    conditions: list[Obj],
    kind: str,
    status: str,
    reason: str,
    message: str,
    *,
    update_time: bool = False,
) -> bool:
    """Set one condition by type; True when something changed."""
    stamp = now_iso()
    for cond in conditions:
        if cond["type"] == kind:
            if (cond["status"], cond.get("reason"), cond.get("message")) == (
                status,
                reason,
                message,
            ):
                return False
            if cond["status"] != status:
                cond["lastTransitionTime"] = stamp
            cond.update(status=status, reason=reason, message=message)
            if update_time:
                cond["lastUpdateTime"] = stamp
            return True
    entry = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp,
    }
    if update_time:
        entry["lastUpdateTime"] = stamp
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

    async def _create_pod(
        self,
        owner: Obj,
        name: str,
        template: Obj,
        labels: dict[str, str],
        env: list[Obj] | None = None,
        hostname: str | None = None,
    ) -> None:
        meta = template.get("metadata") or {}
        spec = copy.deepcopy(template.get("spec") or {})
        if env:
            for container in spec.get("containers") or []:
                container["env"] = [*(container.get("env") or []), *env]
        if hostname:
            spec["hostname"] = hostname
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": owner["metadata"]["namespace"],
                "labels": {**(meta.get("labels") or {}), **labels},
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [_owner(owner)],
            },
            "spec": spec,
        }
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
            _set_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended")
            status.pop("startTime", None)
        else:
            if _true(conditions, "Suspended"):
                _set_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed")
            status.setdefault("startTime", now_iso())
            verdict = self._job_verdict(spec, failed, succeeded)
            if verdict is not None:
                reason, message, kind = verdict
                target = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
                _set_condition(conditions, target, "True", reason, message)
                if not active:
                    _set_condition(conditions, kind, "True", reason, message)
                    if kind == "Complete":
                        status["completionTime"] = now_iso()
                else:
                    await self._delete_pods(active)
            elif not active:
                suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                labels = {
                    "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                    "controller-uid": job["metadata"]["uid"],
                    "batch.kubernetes.io/job-name": job["metadata"]["name"],
                    "job-name": job["metadata"]["name"],
                }
                await self._create_pod(
                    job, f"{job['metadata']['name']}-{suffix}", spec.get("template") or {}, labels
                )
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
        if not conditions:
            _set_condition(
                conditions,
                "Created",
                "True",
                "PyTorchJobCreated",
                f"PyTorchJob {name} is created.",
                update_time=True,
            )
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
            _set_condition(
                conditions,
                "Suspended",
                "True",
                "PyTorchJobSuspended",
                f"PyTorchJob {name} is suspended.",
                update_time=True,
            )
            _set_condition(
                conditions,
                "Running",
                "False",
                "PyTorchJobSuspended",
                f"PyTorchJob {name} is suspended.",
                update_time=True,
            )
            status.pop("startTime", None)
            status["replicaStatuses"] = {rtype: {} for rtype in replicas}
            await self._status("kubeflow.org", "pytorchjobs", job, status)
            return
        if _true(conditions, "Suspended"):
            _set_condition(
                conditions,
                "Suspended",
                "False",
                "PyTorchJobResumed",
                f"PyTorchJob {name} is resumed.",
                update_time=True,
            )
        status.setdefault("startTime", now_iso())
        total = sum(int(r.get("replicas", 1)) for r in replicas.values())
        nproc = str(spec.get("nprocPerNode", "auto"))
        world = total * (int(nproc) if nproc.isdigit() else 1)
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
                    rank = index + 1 if rtype == "Worker" and "Master" in replicas else index
                    labels = {
                        f"{KUBEFLOW}/job-name": name,
                        f"{KUBEFLOW}/operator-name": OPERATOR_NAME,
                        f"{KUBEFLOW}/replica-type": lower,
                        f"{KUBEFLOW}/replica-index": str(index),
                    }
                    if rtype == "Master":
                        labels[f"{KUBEFLOW}/job-role"] = "master"
                    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
                    if "Master" in replicas:
                        addr = f"{name}-master-0"
                        env += [
                            {"name": "MASTER_PORT", "value": str(master_port)},
                            {"name": "PET_MASTER_PORT", "value": str(master_port)},
                            {"name": "MASTER_ADDR", "value": addr},
                            {"name": "PET_MASTER_ADDR", "value": addr},
                            {"name": "WORLD_SIZE", "value": str(world)},
                            {"name": "RANK", "value": str(rank)},
                            {"name": "PET_NODE_RANK", "value": str(rank)},
                        ]
                    env += [
                        {"name": "PET_NPROC_PER_NODE", "value": nproc},
                        {"name": "PET_NNODES", "value": str(total)},
                    ]
                    await self._create_pod(
                        job, pod_name, rspec.get("template") or {}, labels, env, hostname=pod_name
                    )
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
            _set_condition(
                conditions, "Running", "False", "PyTorchJobFailed", message, update_time=True
            )
            _set_condition(
                conditions, "Failed", "True", "PyTorchJobFailed", message, update_time=True
            )
            status["completionTime"] = now_iso()
        elif master.get("succeeded") or (
            "Master" not in replicas
            and all(
                r.get("succeeded") == int(replicas[t].get("replicas", 1))
                for t, r in replica_statuses.items()
            )
        ):
            message = f"PyTorchJob {ns}/{name} successfully completed."
            _set_condition(
                conditions, "Running", "False", "PyTorchJobSucceeded", message, update_time=True
            )
            _set_condition(
                conditions, "Succeeded", "True", "PyTorchJobSucceeded", message, update_time=True
            )
            status["completionTime"] = now_iso()
        elif any(
            _phase(p) == "Running"
            for p in pods
            if (p["metadata"].get("labels") or {}).get(f"{KUBEFLOW}/replica-type")
            == ("master" if "Master" in replicas else "worker")
        ):
            _set_condition(
                conditions,
                "Running",
                "True",
                "PyTorchJobRunning",
                f"PyTorchJob {name} is running.",
                update_time=True,
            )
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
                "ownerReferences": [_owner(job)],
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
