"""Reading the world: a Job or PyTorchJob and its pods → a ChildState; a scrape → Progress.

Child and pod objects are read the way their controllers write them; nothing here decides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kubetrain_contract.exit_codes import EXIT_TERMINATED
from kubetrain_operator.status.redaction import bounded, redact
from kubetrain_operator.status.timing import parse_time

# Labels the Job controller and the Kubeflow training operator put on the pods they create.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
PYTORCHJOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"

#: How long a finished child may wait for its pods' exit codes to be seen (pod and child events
#: arrive on separate watches): past this, the child's own word is taken.
POD_REPORT_GRACE = 30.0


# ----------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Progress:
    """One scrape of the run's metrics Service: sample values by metric name, and when."""

    samples: Mapping[str, float]
    scraped_at: float


ChildPhase = Literal["absent", "pending", "running", "suspended", "succeeded", "failed"]


@dataclass(frozen=True)
class ChildState:
    """What one stage object and its pods say, read the way their controllers write it."""

    name: str
    phase: ChildPhase
    active_pods: int = 0
    exit_code: int | None = None
    message: str | None = None
    reason: str | None = None
    """The reason of the child's Failed condition (e.g. DeadlineExceeded)."""
    result: Mapping[str, Any] | None = None
    finished_at: float | None = None
    running_since: float | None = None
    """Since when the workload runs: a PyTorchJob's Running condition (else its startTime); a
    Job's pod once its container started."""
    suspended: bool = False
    api_version: str = ""
    kind: str = ""

    def unsettled(self, now: float) -> bool:
        """Finished by its controller, but its pods' exit codes are not in yet."""
        if self.phase not in ("succeeded", "failed") or self.exit_code is not None:
            return False
        if not self.active_pods:
            return False
        return now - (self.finished_at or now) < POD_REPORT_GRACE


def _container_terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return None


def pod_terminated(pod: Mapping[str, Any]) -> bool:
    """A pod is done when its phase says so or its containers have all terminated."""
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return True
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return bool(statuses) and all((s.get("state") or {}).get("terminated") for s in statuses)


def pods_of(name: str, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods a Job or PyTorchJob controller created for the child `name`."""
    found = []
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(JOB_NAME_LABEL) == name or labels.get(PYTORCHJOB_NAME_LABEL) == name:
            found.append(pod)
    return found


def _decisive_pod(pods: list[Mapping[str, Any]], failed: bool) -> Mapping[str, Any] | None:
    """Whose exit code tells the story: on failure the first pod that failed on its own (not
    terminated by the others' failure, 143), else the master / only pod."""
    done = [(p, t) for p in pods if (t := _container_terminated(p)) is not None]
    if failed:
        own = [(p, t) for p, t in done if t.get("exitCode") not in (0, EXIT_TERMINATED)]
        pool = own or [(p, t) for p, t in done if t.get("exitCode") != 0] or done
        pool.sort(key=lambda pt: parse_time(pt[1].get("finishedAt")) or math.inf)
        return pool[0][0] if pool else None
    for pod, _ in done:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(REPLICA_TYPE_LABEL, "master").lower() == "master":
            return pod
    return done[0][0] if done else None


def _conditions_true(body: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    conditions = (body.get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if c.get("status") == "True"}


def observe_child(
    name: str, body: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
) -> ChildState:
    """Read a Job (conditions Complete/Failed/Suspended; FailureTarget and SuccessCriteriaMet
    only announce those) or a PyTorchJob (Succeeded/Failed/Suspended/Running/Restarting/Created)
    and its pods' exit codes and termination messages."""
    own = pods_of(name, pods)
    active = sum(1 for p in own if not pod_terminated(p))
    if body is None:
        return ChildState(name, "absent", active_pods=active)
    kind = body.get("kind", "")
    spec = body.get("spec") or {}
    suspended_spec = bool(
        spec.get("suspend") if kind == "Job" else (spec.get("runPolicy") or {}).get("suspend")
    )
    true = _conditions_true(body)
    phase: ChildPhase
    if "Complete" in true or "Succeeded" in true:
        phase = "succeeded"
    elif "Failed" in true:
        phase = "failed"
    elif "Suspended" in true or (suspended_spec and active == 0):
        phase = "suspended"
    elif (
        "Running" in true
        or "Restarting" in true  # the training operator is recreating pods of this attempt
        or (kind == "Job" and (body.get("status") or {}).get("active"))
    ):
        phase = "running"
    else:
        phase = "pending"
    pod = _decisive_pod(own, failed=phase == "failed") if phase in ("succeeded", "failed") else None
    exit_code = message = None
    finished = result = None
    if pod is not None:
        terminated = _container_terminated(pod) or {}
        exit_code = terminated.get("exitCode")
        message = terminated.get("message")
        finished = parse_time(terminated.get("finishedAt"))
        result = _parse_result(message)
    if finished is None and phase in ("succeeded", "failed"):
        condition = true.get("Complete") or true.get("Succeeded") or true.get("Failed") or {}
        finished = parse_time(condition.get("lastTransitionTime"))
    if phase == "failed" and message is None:
        message = (true.get("Failed") or {}).get("message")
    running = true.get("Running")
    if kind == "Job":
        since = _container_started(own) if phase == "running" else None
    else:
        since = parse_time(running.get("lastTransitionTime")) if running else None
        if since is None and phase == "running":
            since = parse_time((body.get("status") or {}).get("startTime"))
    return ChildState(
        name,
        phase,
        active_pods=active,
        exit_code=exit_code,
        message=message,
        reason=(true.get("Failed") or {}).get("reason"),
        result=result,
        finished_at=finished,
        running_since=since,
        suspended=suspended_spec,
        api_version=body.get("apiVersion", ""),
        kind=kind,
    )


def _container_started(pods: Sequence[Mapping[str, Any]]) -> float | None:
    """When a Job's pod started running its container: a pod still waiting for a node or its
    image is counted as `active` by the Job controller, but it has made no progress to miss."""
    started = [
        parse_time(((s.get("state") or {}).get("running") or {}).get("startedAt"))
        for pod in pods
        if not pod_terminated(pod)
        for s in (pod.get("status") or {}).get("containerStatuses") or []
    ]
    known = [t for t in started if t is not None]
    return min(known) if known else None


def _parse_result(message: str | None) -> Mapping[str, Any] | None:
    if not message:
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def failure_message(child: ChildState) -> str:
    """The trainer's own words (the result's `error`), else the raw message, redacted, bounded."""
    text = None
    if child.result is not None and child.result.get("error"):
        text = str(child.result["error"])
    elif child.message:
        text = child.message
    code = f"exit code {child.exit_code}" if child.exit_code is not None else "no exit code"
    line = f"{child.name} failed ({code})" + (f": {text}" if text else "")
    return bounded(redact(line))
