"""A run's children, their pods and the trainer's metrics → its status and next actions — pure.

`derive_status` is the whole decision logic of the operator: the handlers read the world, call it,
patch the status it returns and carry out its actions. It is level-based: the same inputs give the
same answer, so a repeated or missed event changes nothing. What must survive the loss of a child
(a Job removed by its TTL, a stalled attempt deleted) is remembered in the status itself:
`completedStages` and `attemptHistory`.

Ordering contract with the caller: patch the status first, then carry out the actions. A crash in
between leaves a status whose decisions the next reconcile repeats idempotently (creates answer
409, deletes 404), never a decision that is lost.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from kubetrain_operator.api import (
    API_GROUP,
    API_VERSION,
    KIND,
    InvalidRun,
    SpecError,
    TrainingRun,
    parse_run,
)
from kubetrain_operator.cluster_defaults import NO_DEFAULTS, ClusterDefaults
from kubetrain_operator.plan import Plan, Stage, plan_run
from kubetrain_operator.render import (
    render_shared,
    render_stage,
    stage_object_name,
)

# -------------------------------------------------------------------------------------- conditions
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
DATA_READY = "DataReady"
SANITY_PASSED = "SanityPassed"
SUCCEEDED = "Succeeded"
CONDITION_TYPES = (READY, RECONCILING, STALLED, DATA_READY, SANITY_PASSED, SUCCEEDED)

# ----------------------------------------------------------------------------------------- reasons
R_PENDING = "Pending"
R_INVALID_SPEC = "InvalidSpec"
R_WAITING_FOR_UPSTREAM = "WaitingForUpstream"
R_UPSTREAM_FAILED = "UpstreamFailed"
R_PREPROCESSING = "Preprocessing"
R_CACHE_HIT = "CacheHit"
R_CACHE_MISS = "CacheMiss"
R_SANITY_RUNNING = "SanityRunning"
R_LOSS_DROPPED = "LossDropped"
R_SANITY_FAILED = "SanityFailed"
R_NO_SANITY_GATE = "NoSanityGate"
R_TRAINING = "Training"
R_RESTARTING = "Restarting"
R_BACKING_OFF = "BackingOff"
R_PROGRESS_STALLED = "ProgressStalled"
R_PROGRESSING = "Progressing"
R_MERGING = "Merging"
R_SUCCEEDED = "Succeeded"
R_INVALID_INPUT = "InvalidInput"  # exit 2
R_UNHEALTHY = "UnhealthyTraining"  # exit 3
R_STAGE_FAILED = "StageFailed"  # a Job stage failed with a retryable code (operator does not retry)
R_RESTARTS_EXHAUSTED = "RestartsExhausted"
R_SUSPENDED = "Suspended"
R_QUEUED = "Queued"
R_STARTING = "Starting"

# Phases (status.phase, for humans and printer columns).
P_PENDING, P_PREPROCESSING, P_SANITY, P_TRAINING = "Pending", "Preprocessing", "Sanity", "Training"
P_MERGING, P_SUCCEEDED, P_FAILED, P_SUSPENDED = "Merging", "Succeeded", "Failed", "Suspended"

# Stage contract exit codes (docs/architecture.md).
EXIT_INVALID, EXIT_UNHEALTHY, EXIT_TERMINATED = 2, 3, 143
NON_RETRYABLE = (EXIT_INVALID, EXIT_UNHEALTHY)

# Labels the Job controller and the Kubeflow training operator put on the pods they create.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
PYTORCHJOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"

# Trainer metrics read into status.progress (metrics.md; do not rename).
M_STEP = "kubetrain_train_step"
M_TOTAL = "kubetrain_train_total_steps"
M_LOSS = "kubetrain_train_loss"
M_TOKENS_PER_SECOND = "kubetrain_train_tokens_per_second"
M_ETA = "kubetrain_train_eta_seconds"
M_LAST_STEP = "kubetrain_train_last_step_timestamp_seconds"
M_CHECKPOINT = "kubetrain_checkpoint_last_step"
PROGRESS_METRICS = (M_STEP, M_TOTAL, M_LOSS, M_TOKENS_PER_SECOND, M_ETA, M_LAST_STEP, M_CHECKPOINT)
#: `<output>/checkpoints/step-XXXXXXXX`: where the trainer puts complete checkpoints (trainer.md).
CHECKPOINT_DIR = "checkpoints/step-{step:08d}"

#: Attempt reasons: the `reason` label of kubetrain_operator_run_attempts_total (metrics.md).
AttemptReason = Literal["initial", "failure", "stall"]

MESSAGE_LIMIT = 1024
#: How long a finished child may wait for its pods' exit codes to be seen (pod and child events
#: arrive on separate watches): past this, the child's own word is taken.
POD_REPORT_GRACE = 30.0


# ----------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Progress:
    """One scrape of the run's metrics Service: sample values by metric name, and when."""

    samples: Mapping[str, float]
    scraped_at: float


@dataclass(frozen=True)
class Timing:
    """Operator-wide timing (settings, not spec): restart backoff."""

    backoff_base: float = 10.0
    backoff_max: float = 600.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before attempt n+1 after the n-th failed attempt."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(failures - 1, 0)))


# ---------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class EnsureObject:
    """Create `body` unless it exists; `update`: bring an existing one's data up to date;
    `owned`: owned by the run (False: shared by the namespace's runs, the trainer account)."""

    body: dict[str, Any]
    update: bool = False
    attempt_reason: AttemptReason | None = None
    owned: bool = True


@dataclass(frozen=True)
class DeleteObject:
    """Delete a child (its pods go with it through owner references)."""

    api_version: str
    kind: str
    name: str
    why: str


@dataclass(frozen=True)
class SetSuspend:
    """Suspend or resume a Job (`spec.suspend`) or PyTorchJob (`spec.runPolicy.suspend`)."""

    api_version: str
    kind: str
    name: str
    suspend: bool


@dataclass(frozen=True)
class RecordEvent:
    """A Kubernetes event on the run."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RequeueAfter:
    """Reconcile again after this many seconds (backoff), even if nothing happens."""

    seconds: float


Action = EnsureObject | DeleteObject | SetSuspend | RecordEvent | RequeueAfter


# ------------------------------------------------------------------------------------ child state
ChildPhase = Literal["absent", "pending", "running", "suspended", "succeeded", "failed"]


@dataclass(frozen=True)
class ChildState:
    """What one stage object and its pods say, read the way their controllers write it."""

    name: str
    phase: ChildPhase
    active_pods: int = 0
    exit_code: int | None = None
    message: str | None = None
    result: Mapping[str, Any] | None = None
    finished_at: float | None = None
    running_since: float | None = None
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


def parse_time(value: Any) -> float | None:
    """RFC 3339 (as the API server writes it) → unix seconds."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_seconds(text: str) -> float:
    """`15m`, `1h30m`, `90s` (api.DURATION_PATTERN) → seconds."""
    total = 0.0
    for number, unit in re.findall(r"([0-9]+)([hms])", text):
        total += int(number) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def format_eta(seconds: float) -> str:
    """14h02m, 5m07s, 42s: short enough for a printer column."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


_SECRET_PATTERNS = (
    # user:password@ in URLs
    (re.compile(r"(?i)([a-z][a-z0-9+.\-]*://)[^/\s:@]+:[^\s@]+@"), r"\1[REDACTED]@"),
    # presigned S3 URLs and signatures
    (
        re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"),
        r"\1[REDACTED]",
    ),
    # AWS access key ids, HF tokens
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "[REDACTED]"),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), "[REDACTED]"),
    # KEY=value / "key": "value" for anything that looks like a credential
    (
        re.compile(
            r"(?i)((?:secret|password|passwd|token|access[_-]?key|api[_-]?key|credential)"
            r"[A-Za-z0-9_\-]*[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]+"
        ),
        r"\1[REDACTED]",
    ),
)


def redact(text: str) -> str:
    """Strip what looks like a credential from a message a pod wrote, before it reaches status,
    events or logs (the operator never reads Secrets, so patterns are all it can go by)."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


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
    since = parse_time(running.get("lastTransitionTime")) if running else None
    if since is None and phase == "running":
        since = parse_time((body.get("status") or {}).get("startTime"))
    return ChildState(
        name,
        phase,
        active_pods=active,
        exit_code=exit_code,
        message=message,
        result=result,
        finished_at=finished,
        running_since=since,
        suspended=suspended_spec,
        api_version=body.get("apiVersion", ""),
        kind=kind,
    )


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
    return _bounded(redact(line))


def _bounded(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


# ---------------------------------------------------------------------------------------- builder
class _Status:
    """Accumulates the new status from the old one; conditions keep lastTransitionTime unless
    their status changes, and every change becomes an event."""

    def __init__(self, old: Mapping[str, Any], generation: int, now: float) -> None:
        self.old = old
        self.generation, self.now = generation, now
        self.fields: dict[str, Any] = {
            k: v for k, v in old.items() if k not in ("conditions", "observedGeneration")
        }
        self.old_conditions = {c.get("type"): c for c in old.get("conditions") or []}
        self.conditions: dict[str, dict[str, Any]] = {}
        self.actions: list[Action] = []

    def condition(self, type_: str, status: str, reason: str, message: str = "") -> None:
        previous = self.old_conditions.get(type_)
        if previous is not None and previous.get("status") == status:
            since = previous.get("lastTransitionTime") or format_time(self.now)
        else:
            since = format_time(self.now)
        entry = {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": _bounded(message),
            "lastTransitionTime": since,
            "observedGeneration": self.generation,
        }
        self.conditions[type_] = entry
        # A transition: a status that changed, or an abnormal condition raised on the first visit
        # (a run invalid from the start still gets its Warning event).
        changed = previous is None and type_ == STALLED and status == "True"
        changed = changed or (previous is not None and previous.get("status") != status)
        if changed:
            warn = (type_ == STALLED and status == "True") or reason in _WARNING_REASONS
            detail = f": {message}" if message else ""
            self.actions.append(
                RecordEvent(
                    "Warning" if warn else "Normal",
                    reason,
                    _bounded(f"{type_} is {status}{detail}"),
                )
            )

    def keep(self, type_: str, default_reason: str = R_PENDING) -> None:
        """Carry a stage condition over unchanged (Unknown on the first visit)."""
        previous = self.old_conditions.get(type_)
        if previous is None:
            self.condition(type_, "Unknown", default_reason)
        else:
            self.condition(
                type_, previous["status"], previous.get("reason", ""), previous.get("message", "")
            )

    def summary(self, phase: str, ready: tuple[str, str, str], state: str) -> None:
        """The kstatus trio. state: progressing | done | failed | paused."""
        ready_status, reason, message = ready
        self.fields["phase"] = phase
        self.condition(READY, ready_status, reason, message)
        self.condition(RECONCILING, "True" if state == "progressing" else "False", reason, message)
        self.condition(
            STALLED,
            "True" if state == "failed" else "False",
            reason if state == "failed" else R_PROGRESSING,
            message if state == "failed" else "",
        )
        if state == "failed":
            self.condition(SUCCEEDED, "False", reason, message)
        elif state == "done":
            self.condition(SUCCEEDED, "True", reason, message)
        else:
            self.condition(SUCCEEDED, "Unknown", reason, message)
        for type_ in (DATA_READY, SANITY_PASSED):
            if type_ not in self.conditions:
                self.keep(type_)

    def build(self) -> dict[str, Any]:
        status = dict(self.fields)
        status["observedGeneration"] = self.generation
        status["conditions"] = [self.conditions[t] for t in CONDITION_TYPES if t in self.conditions]
        return status


_WARNING_REASONS = {
    R_INVALID_SPEC,
    R_UPSTREAM_FAILED,
    R_SANITY_FAILED,
    R_INVALID_INPUT,
    R_UNHEALTHY,
    R_STAGE_FAILED,
    R_RESTARTS_EXHAUSTED,
    R_PROGRESS_STALLED,
}


# ----------------------------------------------------------------------------------------- derive
def derive_status(
    run: Mapping[str, Any],
    children: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    progress: Progress | None,
    now: float,
    *,
    upstream: Mapping[str, Any] | None = None,
    timing: Timing = Timing(),
    defaults: ClusterDefaults = NO_DEFAULTS,
) -> tuple[dict[str, Any], list[Action]]:
    """The run's new status and what to do next.

    `children`: the run's Jobs and PyTorchJobs (owned by it); `pods`: pods labelled with the run;
    `progress`: the latest scrape of its metrics Service (None: none yet); `upstream`: the run
    named by `model.fromRun` (None: not found); `now`: unix seconds; `defaults`: the cluster's
    defaults for what the spec leaves unset (the plan applies them).
    """
    meta = run.get("metadata") or {}
    builder = _Status(run.get("status") or {}, int(meta.get("generation") or 1), now)
    document = _document(run)
    try:
        parsed = _parsed(document)
    except InvalidRun as error:
        message = "; ".join(str(p) for p in error.problems)
        builder.summary(P_FAILED, ("False", R_INVALID_SPEC, message), "failed")
        return builder.build(), builder.actions
    namespace = meta.get("namespace") or "default"
    upstream_model: str | None = None
    if parsed.spec.model.from_run is not None:
        upstream_model = _upstream(builder, parsed.spec.model.from_run, upstream)
        if upstream_model is None:
            return builder.build(), builder.actions
    try:
        plan = _planned(document, upstream_model, defaults)
    except SpecError as error:
        builder.summary(P_FAILED, ("False", R_INVALID_SPEC, str(error)), "failed")
        return builder.build(), builder.actions
    by_name = {(c.get("metadata") or {}).get("name"): c for c in children}
    _Lifecycle(parsed, plan, namespace, builder, by_name, pods, progress, timing).run()
    return builder.build(), builder.actions


#: Metadata that changes with every write (a status patch, too) and that parse_run keeps but
#: nothing reads: left out of the cache key.
_VOLATILE_METADATA = ("resourceVersion", "managedFields")


def _document(run: Mapping[str, Any]) -> str:
    """The run as parse_run reads it, canonical JSON: the key of the parse and plan caches."""
    meta = {k: v for k, v in (run.get("metadata") or {}).items() if k not in _VOLATILE_METADATA}
    return json.dumps(
        {"metadata": meta, "spec": run.get("spec")}, sort_keys=True, separators=(",", ":")
    )


@functools.lru_cache(maxsize=1024)
def _parsed(document: str) -> TrainingRun:
    """parse_run, once per content: a run's status changes far more often than its spec, and
    every child event reconciles it (bench/operator.py). Refusals are not cached."""
    body = json.loads(document) | {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND}
    return parse_run(body)


@functools.lru_cache(maxsize=1024)
def _planned(document: str, upstream_model: str | None, defaults: ClusterDefaults) -> Plan:
    """plan_run of the parsed run, once per content, upstream model and cluster defaults (the
    plan is immutable: nothing downstream changes it)."""
    return plan_run(_parsed(document), upstream_model=upstream_model, defaults=defaults)


def _upstream(builder: _Status, name: str, upstream: Mapping[str, Any] | None) -> str | None:
    """The parent's output model once it has Succeeded; otherwise the reason this run waits."""
    if upstream is None:
        builder.summary(
            P_PENDING,
            ("False", R_WAITING_FOR_UPSTREAM, f"waiting for TrainingRun {name!r}: not found"),
            "progressing",
        )
        return None
    status = upstream.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    succeeded = conditions.get(SUCCEEDED) or {}
    if succeeded.get("status") == "False":
        message = (
            f"TrainingRun {name!r} failed: {succeeded.get('message') or succeeded.get('reason')}"
        )
        builder.summary(P_FAILED, ("False", R_UPSTREAM_FAILED, message), "failed")
        return None
    model = (status.get("outputs") or {}).get("model")
    if succeeded.get("status") != "True" or not model:
        phase = status.get("phase") or "Pending"
        message = f"waiting for TrainingRun {name!r} to succeed (phase {phase})"
        builder.summary(P_PENDING, ("False", R_WAITING_FOR_UPSTREAM, message), "progressing")
        return None
    builder.fields["upstream"] = {"run": name, "model": model}
    return str(model)


class _Lifecycle:
    """Walks the plan's stages in order; stops at the first one that is not done."""

    def __init__(
        self,
        run: TrainingRun,
        plan: Plan,
        namespace: str,
        status: _Status,
        children: Mapping[Any, Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
        progress: Progress | None,
        timing: Timing,
    ) -> None:
        self.run_, self.plan, self.namespace, self.status = run, plan, namespace, status
        self.children, self.pods, self.progress, self.timing = children, pods, progress, timing
        self.spec = run.spec
        old = status.old
        self.completed: list[str] = list(old.get("completedStages") or [])
        self.history: list[dict[str, Any]] = [dict(a) for a in old.get("attemptHistory") or []]
        self.rungs = [s for s in plan.stages if s.name.startswith("sanity")]

    # ------------------------------------------------------------------------------- walking
    def run(self) -> None:
        if not self.rungs:
            self.status.condition(SANITY_PASSED, "True", R_NO_SANITY_GATE, "no sanity gate")
        for stage in self.plan.stages:
            if stage.name in self.completed:
                continue
            done = self.train(stage) if stage.name == "train" else self.job_stage(stage)
            if not done:
                self.finish_fields()
                return
            self.completed.append(stage.name)
        self.finish_fields()
        self.status.summary(P_SUCCEEDED, ("True", R_SUCCEEDED, "every stage finished"), "done")

    def finish_fields(self) -> None:
        self.status.fields["completedStages"] = self.completed
        self.status.fields["attemptHistory"] = self.history
        self.status.fields["attempts"] = len(self.history)

    def objects_for(self, stage: Stage, attempt: int = 1) -> list[dict[str, Any]]:
        rendered: Any = render_stage(
            self.run_, self.plan, stage, attempt=attempt, namespace=self.namespace
        )
        return list(rendered) if isinstance(rendered, list) else [rendered]

    def ensure_child(
        self, stage: Stage, attempt: int = 1, reason: AttemptReason | None = None
    ) -> None:
        """The shared objects (the trainer ServiceAccount; ConfigMap: kept current, e.g.
        resources; metrics Service), then the stage's own object."""
        for obj in render_shared(self.plan, namespace=self.namespace):
            kind = obj["kind"]
            self.status.actions.append(
                EnsureObject(obj, update=kind == "ConfigMap", owned=kind != "ServiceAccount")
            )
        for body in self.objects_for(stage, attempt):
            self.status.actions.append(EnsureObject(body, attempt_reason=reason))

    def stage_phase(self, stage: Stage) -> str:
        if stage.name == "preprocess":
            return P_PREPROCESSING
        if stage.name.startswith("sanity"):
            return P_SANITY
        return P_MERGING if stage.name == "merge" else P_TRAINING

    def stage_reason(self, stage: Stage) -> str:
        if stage.name == "preprocess":
            return R_PREPROCESSING
        if stage.name.startswith("sanity"):
            return R_SANITY_RUNNING
        return R_MERGING if stage.name == "merge" else R_TRAINING

    def suspend_sync(self, child: ChildState) -> None:
        """spec.suspend → the child's suspend; with a Kueue queue, Kueue owns it."""
        if self.spec.queue_name:
            return
        if child.phase in ("succeeded", "failed", "absent"):
            return
        if child.suspended != self.spec.suspend:
            self.status.actions.append(
                SetSuspend(child.api_version, child.kind, child.name, self.spec.suspend)
            )

    def waiting(self, stage: Stage, child: ChildState) -> None:
        """Summary for a stage whose child exists and has not finished."""
        phase, reason = self.stage_phase(stage), self.stage_reason(stage)
        message = f"{child.name}: " + ("starting" if child.phase == "pending" else child.phase)
        if stage.name == "train" and child.phase == "pending":
            reason = R_STARTING
        if self.spec.suspend and not self.spec.queue_name:
            self.status.summary(P_SUSPENDED, ("False", R_SUSPENDED, message), "paused")
            return
        if child.phase == "suspended" and self.spec.queue_name:
            message = f"{child.name}: waiting for admission by Kueue queue {self.spec.queue_name}"
            self.status.summary(phase, ("False", R_QUEUED, message), "progressing")
            return
        if stage.name == "train":
            message = self.progress_message() or message
        self.status.summary(phase, ("False", reason, message), "progressing")

    def not_started(self, stage: Stage) -> bool:
        """True when the stage may not start now (suspended run)."""
        if self.spec.suspend:
            message = f"suspended before {stage.name}"
            self.status.summary(P_SUSPENDED, ("False", R_SUSPENDED, message), "paused")
            return True
        return False

    def failed(self, reason: str, message: str) -> None:
        self.status.summary(P_FAILED, ("False", reason, message), "failed")

    # ------------------------------------------------------------------------ Job-like stages
    def job_stage(self, stage: Stage) -> bool:
        """preprocess, sanity rungs and merge: run once; any failure ends the run."""
        name = stage_object_name(self.plan, stage)
        child = observe_child(name, self.children.get(name), self.pods)
        if child.unsettled(self.status.now):
            self.stage_pending(stage)
            self.waiting(stage, child)
            return False
        if child.phase == "absent":
            if child.active_pods:  # a deleted child's pods are still stopping
                self.waiting(stage, child)
                return False
            if self.not_started(stage):
                return False
            self.ensure_child(stage)
            self.stage_pending(stage)
            self.status.summary(
                self.stage_phase(stage),
                ("False", self.stage_reason(stage), f"{name}: starting"),
                "progressing",
            )
            return False
        if child.phase == "succeeded":
            self.stage_succeeded(stage, child)
            return True
        if child.phase == "failed":
            self.stage_failed(stage, child)
            return False
        self.suspend_sync(child)
        self.stage_pending(stage)
        self.waiting(stage, child)
        return False

    def stage_pending(self, stage: Stage) -> None:
        if stage.name == "preprocess":
            self.status.condition(DATA_READY, "False", R_PREPROCESSING, "tokenizing")
        elif stage.name.startswith("sanity"):
            index = self.rungs.index(stage) + 1
            self.status.condition(
                SANITY_PASSED, "False", R_SANITY_RUNNING, f"rung {index}/{len(self.rungs)} running"
            )

    def stage_succeeded(self, stage: Stage, child: ChildState) -> None:
        result = child.result or {}
        if stage.name == "preprocess":
            self.status.fields["dataset"] = _dataset(result, self.plan)
            hit = bool(result.get("cacheHit"))
            tokens = result.get("trainTokens")
            detail = f"{tokens} training tokens" if tokens is not None else "dataset ready"
            self.status.condition(
                DATA_READY,
                "True",
                R_CACHE_HIT if hit else R_CACHE_MISS,
                ("cache hit: " if hit else "built: ") + detail,
            )
        elif stage.name.startswith("sanity"):
            index = self.rungs.index(stage) + 1
            report = dict(result.get("sanity") or {})
            rungs = [r for r in self.status.fields.get("sanity") or [] if r.get("rung") != index]
            rungs.append({"rung": index, "passed": True, **_numbers(report)})
            self.status.fields["sanity"] = sorted(rungs, key=lambda r: r["rung"])
            message = f"rung {index}/{len(self.rungs)}: " + _gate_text(report)
            last = index == len(self.rungs)
            self.status.condition(
                SANITY_PASSED,
                "True" if last else "False",
                R_LOSS_DROPPED if last else R_SANITY_RUNNING,
                message,
            )
        elif stage.name == "merge":
            outputs = dict(self.status.fields.get("outputs") or {})
            merged = (result.get("outputs") or {}).get("merged")
            if merged:
                outputs["model"] = self.plan.public_uri(merged)
            for key in ("perplexity", "evalLoss"):
                if result.get(key) is not None:
                    self.status.fields.setdefault("evaluation", {})[key] = result[key]
            self.status.fields["outputs"] = outputs

    def stage_failed(self, stage: Stage, child: ChildState) -> None:
        message = failure_message(child)
        code = child.exit_code
        if stage.name.startswith("sanity"):
            index = self.rungs.index(stage) + 1
            report = dict((child.result or {}).get("sanity") or {})
            rungs = [r for r in self.status.fields.get("sanity") or [] if r.get("rung") != index]
            rungs.append({"rung": index, "passed": False, **_numbers(report)})
            self.status.fields["sanity"] = sorted(rungs, key=lambda r: r["rung"])
            self.status.condition(
                SANITY_PASSED,
                "False",
                R_SANITY_FAILED,
                f"rung {index}/{len(self.rungs)}: {message}",
            )
            reason = R_SANITY_FAILED
        elif code == EXIT_INVALID:
            reason = R_INVALID_INPUT
        elif code == EXIT_UNHEALTHY:
            reason = R_UNHEALTHY
        else:
            reason = R_STAGE_FAILED
            message += f" — delete Job {child.name} to run the stage again"
        if stage.name == "preprocess":
            self.status.condition(DATA_READY, "False", reason, message)
        self.failed(reason, message)

    # --------------------------------------------------------------------------------- train
    def train(self, stage: Stage) -> bool:
        """Attempts of the training PyTorchJob: restarts, backoff, stalls, never two at once."""
        if not self.history:
            if self.not_started(stage):
                return False
            self.start_attempt(stage, "initial", "initial attempt")
            return False
        current = self.history[-1]
        attempt = int(current["attempt"])
        name = stage_object_name(self.plan, stage, attempt)
        child = observe_child(name, self.children.get(name), self.pods)
        if "result" not in current:
            if child.unsettled(self.status.now):
                self.waiting(stage, child)
                return False
            if child.phase == "absent":
                if child.active_pods:
                    self.waiting(stage, child)
                    return False
                # Just created (not yet seen) or lost in a crash: create-if-absent again.
                self.ensure_child(stage, attempt)
                self.status.summary(
                    P_TRAINING, ("False", R_STARTING, f"{name}: starting"), "progressing"
                )
                return False
            if child.phase == "succeeded":
                self.train_succeeded(current, child)
                return True
            if child.phase == "failed":
                current.update(
                    result="Failed",
                    exitCode=child.exit_code,
                    message=failure_message(child),
                    finishTime=format_time(child.finished_at or self.status.now),
                )
            elif self.stalled(child):
                current.update(
                    result="Stalled",
                    message=self.stall_message(child),
                    finishTime=format_time(self.status.now),
                )
            else:
                self.suspend_sync(child)
                self.update_progress()
                self.waiting(stage, child)
                return False
        return self.after_attempt(stage, current, child)

    def after_attempt(self, stage: Stage, current: dict[str, Any], child: ChildState) -> bool:
        """The latest attempt ended without success: stop it fully, then retry or give up."""
        result, code = current.get("result"), current.get("exitCode")
        if result == "Succeeded":
            return True
        message = str(current.get("message") or "")
        restarts = len(self.history) - 1
        if result == "Failed" and code in NON_RETRYABLE:
            reason = R_INVALID_INPUT if code == EXIT_INVALID else R_UNHEALTHY
            self.failed(reason, message)
            return False
        if restarts >= self.spec.max_restarts:
            self.failed(
                R_RESTARTS_EXHAUSTED,
                f"{restarts} restart(s) of {self.spec.max_restarts} used; last: {message}",
            )
            return False
        # Never two trainers: the old attempt's pods must all have terminated first.
        if child.phase != "absent" and (child.active_pods or result == "Stalled"):
            self.status.actions.append(
                DeleteObject(child.api_version, child.kind, child.name, str(result).lower())
            )
        if child.active_pods:
            self.status.summary(
                P_TRAINING,
                (
                    "False",
                    R_RESTARTING,
                    f"{message}; waiting for {child.active_pods} pod(s) of {child.name} to stop",
                ),
                "progressing",
            )
            return False
        if result == "Failed":
            finished = parse_time(current.get("finishTime")) or self.status.now
            failures = sum(1 for a in self.history if a.get("result") == "Failed")
            wake = finished + self.timing.backoff(failures)
            if wake > self.status.now:
                self.status.actions.append(RequeueAfter(wake - self.status.now))
                self.status.summary(
                    P_TRAINING,
                    (
                        "False",
                        R_BACKING_OFF,
                        f"{message}; attempt {len(self.history) + 1} in "
                        f"{format_eta(wake - self.status.now)}",
                    ),
                    "progressing",
                )
                return False
        if self.not_started(stage):
            return False
        why: AttemptReason = "stall" if result == "Stalled" else "failure"
        self.start_attempt(stage, why, message)
        return False

    def start_attempt(self, stage: Stage, why: AttemptReason, message: str) -> None:
        attempt = len(self.history) + 1
        self.history.append(
            {"attempt": attempt, "reason": why, "startTime": format_time(self.status.now)}
        )
        self.ensure_child(stage, attempt, reason=why)
        name = stage_object_name(self.plan, stage, attempt)
        text = f"attempt {attempt} ({why}): {name}" + (
            f" after: {message}" if why != "initial" else ""
        )
        self.status.actions.append(RecordEvent("Normal", "AttemptStarted", _bounded(text)))
        self.status.summary(P_TRAINING, ("False", R_STARTING, f"{name}: starting"), "progressing")

    def train_succeeded(self, current: dict[str, Any], child: ChildState) -> None:
        result = child.result or {}
        current.update(
            result="Succeeded", finishTime=format_time(child.finished_at or self.status.now)
        )
        outputs = dict(self.status.fields.get("outputs") or {})
        final = self.plan.public_uri(
            (result.get("outputs") or {}).get("final") or f"{self.plan.output_uri}/final"
        )
        if self.spec.method.adapter.type != "none":
            outputs["adapter"] = final
        else:
            outputs["model"] = final
        self.status.fields["outputs"] = outputs
        if result.get("checkpoint"):
            checkpoint = dict(result["checkpoint"])
            if isinstance(checkpoint.get("uri"), str):
                checkpoint["uri"] = self.plan.public_uri(checkpoint["uri"])
            self.status.fields["checkpoint"] = checkpoint
        progress = dict(self.status.fields.get("progress") or {})
        for key, value in (("step", result.get("step")), ("totalSteps", result.get("totalSteps"))):
            if value is not None:
                progress[key] = value
        if result.get("loss") is not None:
            progress["loss"] = result["loss"]
        progress["eta"] = "0s"
        self.status.fields["progress"] = progress

    # ------------------------------------------------------------------------------ progress
    def update_progress(self) -> None:
        """status.progress from the latest scrape; unchanged when there is none."""
        if self.progress is None:
            return
        samples = self.progress.samples
        progress = dict(self.status.fields.get("progress") or {})
        if M_STEP in samples:
            progress["step"] = int(samples[M_STEP])
        if M_TOTAL in samples:
            progress["totalSteps"] = int(samples[M_TOTAL])
        if M_LOSS in samples and math.isfinite(samples[M_LOSS]):
            progress["loss"] = round(samples[M_LOSS], 4)
        if M_TOKENS_PER_SECOND in samples:
            progress["tokensPerSecond"] = round(samples[M_TOKENS_PER_SECOND], 1)
        if M_ETA in samples and math.isfinite(samples[M_ETA]):
            progress["eta"] = format_eta(samples[M_ETA])
        if samples.get(M_LAST_STEP):
            progress["lastStepTime"] = format_time(samples[M_LAST_STEP])
        progress["scrapeTime"] = format_time(self.progress.scraped_at)
        self.status.fields["progress"] = progress
        if samples.get(M_CHECKPOINT):
            step = int(samples[M_CHECKPOINT])
            uri = self.plan.public_uri(f"{self.plan.output_uri}/{CHECKPOINT_DIR.format(step=step)}")
            self.status.fields["checkpoint"] = {"step": step, "uri": uri}

    def heartbeat(self, child: ChildState) -> float | None:
        """Last sign of step progress: the trainer's last-step time (fresh or remembered), else
        when the attempt started running."""
        beats = [child.running_since]
        if self.progress is not None and self.progress.samples.get(M_LAST_STEP):
            beats.append(self.progress.samples[M_LAST_STEP])
        remembered = parse_time((self.status.fields.get("progress") or {}).get("lastStepTime"))
        started = parse_time(self.history[-1].get("startTime"))
        if remembered is not None and (started is None or remembered >= started):
            beats.append(remembered)
        known = [b for b in beats if b is not None]
        return max(known) if known else None

    def stalled(self, child: ChildState) -> bool:
        if child.phase != "running" or self.spec.suspend:
            return False
        beat = self.heartbeat(child)
        timeout = duration_seconds(self.spec.stall_timeout)
        return beat is not None and self.status.now - beat > timeout

    def stall_message(self, child: ChildState) -> str:
        beat = self.heartbeat(child) or self.status.now
        return (
            f"{child.name}: no training step for {format_eta(self.status.now - beat)} "
            f"(stallTimeout {self.spec.stall_timeout})"
        )

    def progress_message(self) -> str:
        progress = self.status.fields.get("progress") or {}
        if progress.get("step") is None:
            return ""
        total = progress.get("totalSteps")
        text = f"step {progress['step']}" + (f"/{total}" if total else "")
        return text + (f", loss {progress['loss']}" if progress.get("loss") is not None else "")


def _numbers(report: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("firstLoss", "lastLoss", "lossDrop", "maxGradNorm", "steps")
    return {
        k: report[k]
        for k in keys
        if isinstance(report.get(k), int | float) and math.isfinite(report[k])
    }


def _gate_text(report: Mapping[str, Any]) -> str:
    first, last, steps = report.get("firstLoss"), report.get("lastLoss"), report.get("steps")
    if isinstance(first, int | float) and isinstance(last, int | float):
        return f"loss {first:.2f} → {last:.2f} in {steps} steps"
    return "passed"


def _dataset(result: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """status.dataset from the preprocess stage's result (its termination message)."""
    dataset: dict[str, Any] = {"cacheKey": result.get("key"), "cacheHit": result.get("cacheHit")}
    for key in ("uri", "trainTokens", "validationTokens", "rowsRead", "accepted", "blocks"):
        if result.get(key) is not None:
            dataset[key] = result[key]
    if isinstance(dataset.get("uri"), str):
        dataset["uri"] = plan.public_uri(dataset["uri"])
    dataset["rejectedRows"] = dict(result.get("rejected") or {})
    return {k: v for k, v in dataset.items() if v is not None}
