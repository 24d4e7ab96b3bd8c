"""The walk over a run's planned stages: which child to create, wait for, judge or retry.

Every stage is handled by its role (`plan.StageRole`) through one table, `ROLES`: the phase and
reason it shows, the condition it drives, how it is walked (run once, or attempts with restarts)
and what its success and failure write into the status. Nothing here dispatches on a stage's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from pydantic import ValidationError

from kubetrain_contract import layout, metrics
from kubetrain_contract.durations import duration_seconds, format_duration
from kubetrain_contract.exit_codes import EXIT_INVALID, EXIT_UNHEALTHY, NON_RETRYABLE
from kubetrain_contract.memory import gib
from kubetrain_operator.api import TrainingRun
from kubetrain_operator.plan import Plan, Stage, StageRole
from kubetrain_operator.render import render_shared, render_stage, stage_object_name
from kubetrain_operator.run_status import FIT_ROWS, SOURCE_ROWS, FitRow, SourceStatus
from kubetrain_operator.status.actions import (
    DeleteObject,
    EnsureObject,
    RecordEvent,
    RequeueAfter,
    SetSuspend,
)
from kubetrain_operator.status.builder import StatusBuilder
from kubetrain_operator.status.observation import (
    ChildState,
    Progress,
    failure_message,
    observe_child,
)
from kubetrain_operator.status.redaction import bounded
from kubetrain_operator.status.timing import Timing, format_time, parse_time
from kubetrain_operator.status.vocabulary import (
    DATA_READY,
    P_FAILED,
    P_MERGING,
    P_PREPROCESSING,
    P_SANITY,
    P_SUCCEEDED,
    P_SUSPENDED,
    P_TRAINING,
    R_BACKING_OFF,
    R_CACHE_HIT,
    R_CACHE_MISS,
    R_DEADLINE_EXCEEDED,
    R_DOES_NOT_FIT,
    R_INVALID_INPUT,
    R_LOSS_DROPPED,
    R_MERGING,
    R_NO_SANITY_GATE,
    R_PREPROCESSING,
    R_PROGRESS_STALLED,
    R_QUEUED,
    R_RESTARTING,
    R_RESTARTS_EXHAUSTED,
    R_SANITY_FAILED,
    R_SANITY_RUNNING,
    R_STAGE_FAILED,
    R_STARTING,
    R_SUCCEEDED,
    R_SUSPENDED,
    R_TRAINING,
    R_UNHEALTHY,
    SANITY_PASSED,
    STALLED,
    AttemptReason,
)


class Lifecycle:
    """Walks the plan's stages in order; stops at the first one that is not done."""

    def __init__(
        self,
        run: TrainingRun,
        plan: Plan,
        namespace: str,
        status: StatusBuilder,
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
        self.rungs = plan.sanity_stages

    # ------------------------------------------------------------------------------- walking
    def run(self) -> None:
        if self.plan.fit_report is not None:  # sized while planning: the table is known now
            self.status.fields["fit"] = _fit(list(self.plan.fit_report.rows))
        if not self.rungs:
            self.status.condition(SANITY_PASSED, "True", R_NO_SANITY_GATE, "no sanity gate")
        for stage in self.plan.stages:
            if stage.name in self.completed:
                continue
            done = ROLES[stage.role].walk(self, stage)
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
        role = ROLES[stage.role]
        phase, reason = role.phase, role.reason
        message = f"{child.name}: " + ("starting" if child.phase == "pending" else child.phase)
        if role.reports_progress and child.phase == "pending":
            reason = R_STARTING
        if self.spec.suspend and not self.spec.queue_name:
            self.status.summary(P_SUSPENDED, ("False", R_SUSPENDED, message), "paused")
            return
        if child.phase == "suspended" and self.spec.queue_name:
            message = f"{child.name}: waiting for admission by Kueue queue {self.spec.queue_name}"
            self.status.summary(phase, ("False", R_QUEUED, message), "progressing")
            return
        if role.reports_progress:
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
            if self.stopped_for_stall(stage, name):
                return False
            if child.active_pods:  # a deleted child's pods are still stopping
                self.waiting(stage, child)
                return False
            if self.not_started(stage):
                return False
            self.ensure_child(stage)
            self.stage_pending(stage)
            role = ROLES[stage.role]
            self.status.summary(
                role.phase, ("False", role.reason, f"{name}: starting"), "progressing"
            )
            return False
        if child.phase == "succeeded":
            self.stage_succeeded(stage, child)
            return True
        if child.phase == "failed":
            self.stage_failed(stage, child)
            return False
        self.suspend_sync(child)
        if self.stalled(stage, child):
            self.status.actions.append(
                DeleteObject(child.api_version, child.kind, child.name, "stalled")
            )
            self.stage_stalled(stage, self.stall_message(stage, child))
            return False
        self.stage_pending(stage)
        self.waiting(stage, child)
        return False

    def stage_stalled(self, stage: Stage, message: str) -> None:
        """The run fails; the stage's own condition says why too."""
        condition = ROLES[stage.role].condition
        if condition is not None:
            self.status.condition(condition, "False", R_PROGRESS_STALLED, message)
        self.failed(R_PROGRESS_STALLED, message)

    def stopped_for_stall(self, stage: Stage, name: str) -> bool:
        """A Job deleted for a stall is gone, so the status remembers it: the run stays failed
        until its spec changes (a new generation, e.g. a longer stallTimeout) and runs it again."""
        stalled = self.status.old_conditions.get(STALLED) or {}
        message = str(stalled.get("message") or "")
        if (
            stalled.get("status") == "True"
            and stalled.get("reason") == R_PROGRESS_STALLED
            and stalled.get("observedGeneration") == self.status.generation
            and message.startswith(f"{name}:")
        ):
            self.stage_stalled(stage, message)
            return True
        return False

    def stage_pending(self, stage: Stage) -> None:
        pending = ROLES[stage.role].pending
        if pending is not None:
            pending(self, stage)

    def stage_succeeded(self, stage: Stage, child: ChildState) -> None:
        succeeded = ROLES[stage.role].succeeded
        if succeeded is not None:
            succeeded(self, stage, child.result or {})

    def stage_failed(self, stage: Stage, child: ChildState) -> None:
        judge = ROLES[stage.role].failed or Lifecycle.exit_failure
        self.failed(*judge(self, stage, child, failure_message(child)))

    def exit_failure(self, stage: Stage, child: ChildState, message: str) -> tuple[str, str]:
        """A stage's failure by its exit code (the stage contract): the reason and message; a
        Job that Kubernetes stopped at its activeDeadlineSeconds, by that."""
        if child.reason == JOB_DEADLINE_EXCEEDED and stage.deadline_seconds:
            return R_DEADLINE_EXCEEDED, (
                f"{child.name}: stopped after stageDeadline {self.spec.stage_deadline} — raise "
                f"spec.stageDeadline if the stage needs longer, then delete Job {child.name} to "
                "run it again"
            )
        if child.exit_code == EXIT_INVALID:
            return R_INVALID_INPUT, message
        if child.exit_code == EXIT_UNHEALTHY:
            return R_UNHEALTHY, message
        return R_STAGE_FAILED, message + f" — delete Job {child.name} to run the stage again"

    # ---------------------------------------------------------------------------- preprocess
    def preprocess_pending(self, stage: Stage) -> None:
        del stage
        self.status.condition(DATA_READY, "False", R_PREPROCESSING, "tokenizing")

    def preprocess_succeeded(self, stage: Stage, result: Mapping[str, Any]) -> None:
        del stage
        self.status.fields["dataset"] = _dataset(result, self.plan)
        if result.get("fit"):
            self.status.fields["fit"] = _fit(result["fit"])
        hit = bool(result.get("cacheHit"))
        tokens = result.get("trainTokens")
        detail = f"{tokens} training tokens" if tokens is not None else "dataset ready"
        self.status.condition(
            DATA_READY,
            "True",
            R_CACHE_HIT if hit else R_CACHE_MISS,
            ("cache hit: " if hit else "built: ") + detail,
        )

    def preprocess_failed(self, stage: Stage, child: ChildState, message: str) -> tuple[str, str]:
        reason, message = self.exit_failure(stage, child, message)
        rows = (child.result or {}).get("fit")
        if reason == R_INVALID_INPUT and isinstance(rows, list):
            # The stage sized the model from its config.json and a stage does not fit: refused
            # before any tokenizing, and before any GPU is asked for.
            self.status.fields["fit"] = _fit(rows)
            if any(isinstance(r, Mapping) and r.get("fits") is False for r in rows):
                reason = R_DOES_NOT_FIT
        self.status.condition(DATA_READY, "False", reason, message)
        return reason, message

    # -------------------------------------------------------------------------------- sanity
    def sanity_pending(self, stage: Stage) -> None:
        index = self.rungs.index(stage) + 1
        self.status.condition(
            SANITY_PASSED, "False", R_SANITY_RUNNING, f"rung {index}/{len(self.rungs)} running"
        )

    def sanity_succeeded(self, stage: Stage, result: Mapping[str, Any]) -> None:
        index = self.record_rung(stage, result, passed=True)
        message = f"rung {index}/{len(self.rungs)}: " + _gate_text(result.get("sanity") or {})
        message += memory_warning(result, self.rung_path(index))
        last = index == len(self.rungs)
        self.status.condition(
            SANITY_PASSED,
            "True" if last else "False",
            R_LOSS_DROPPED if last else R_SANITY_RUNNING,
            message,
        )

    def sanity_failed(self, stage: Stage, child: ChildState, message: str) -> tuple[str, str]:
        index = self.record_rung(stage, child.result or {}, passed=False)
        warning = memory_warning(child.result or {}, self.rung_path(index))
        self.status.condition(
            SANITY_PASSED,
            "False",
            R_SANITY_FAILED,
            f"rung {index}/{len(self.rungs)}: {message}{warning}",
        )
        return R_SANITY_FAILED, message

    def rung_path(self, index: int) -> str:
        """The spec path of rung `index` (from 1): a ladder's entry, or the single gate."""
        sanity = self.spec.sanity
        if sanity is not None and sanity.rungs is not None:
            return f"spec.sanity.rungs[{index - 1}]"
        return "spec.sanity"

    def record_rung(self, stage: Stage, result: Mapping[str, Any], passed: bool) -> int:
        """status.sanity: the rung's gate numbers, one entry per rung; returns its index."""
        index = self.rungs.index(stage) + 1
        report = dict(result.get("sanity") or {})
        rungs = [r for r in self.status.fields.get("sanity") or [] if r.get("rung") != index]
        rungs.append({"rung": index, "passed": passed, **_numbers(report), **_measured(result)})
        self.status.fields["sanity"] = sorted(rungs, key=lambda r: r["rung"])
        return index

    # --------------------------------------------------------------------------------- merge
    def merge_succeeded(self, stage: Stage, result: Mapping[str, Any]) -> None:
        del stage
        outputs = dict(self.status.fields.get("outputs") or {})
        merged = (result.get("outputs") or {}).get("merged")
        if merged:
            outputs["model"] = self.plan.public_uri(merged)
        if result.get("hubCommit"):  # output.push
            outputs["hubRepo"], outputs["hubCommit"] = result["hubRepo"], result["hubCommit"]
        for key in ("perplexity", "evalLoss"):
            if result.get(key) is not None:
                self.status.fields.setdefault("evaluation", {})[key] = result[key]
        self.status.fields["outputs"] = outputs

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
            elif self.stalled(stage, child):
                current.update(
                    result="Stalled",
                    message=self.stall_message(stage, child),
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
                        f"{format_duration(wake - self.status.now)}",
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
        self.status.actions.append(RecordEvent("Normal", "AttemptStarted", bounded(text)))
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
        measured = _measured(result)  # the busiest rank's peak, where the scrape saw rank 0's
        for key in ("peakMemoryBytes", "memoryEstimateBytes", "deviceMemoryBytes"):
            if key in measured:
                progress[key] = measured[key]
        progress["eta"] = "0s"
        self.status.fields["progress"] = progress

    # ------------------------------------------------------------------------------ progress
    def update_progress(self) -> None:
        """status.progress from the latest scrape; unchanged when there is none."""
        if self.progress is None:
            return
        samples = self.progress.samples
        progress = dict(self.status.fields.get("progress") or {})
        if metrics.TRAIN_STEP in samples:
            progress["step"] = int(samples[metrics.TRAIN_STEP])
        if metrics.TRAIN_TOTAL_STEPS in samples:
            progress["totalSteps"] = int(samples[metrics.TRAIN_TOTAL_STEPS])
        if metrics.TRAIN_LOSS in samples and math.isfinite(samples[metrics.TRAIN_LOSS]):
            progress["loss"] = round(samples[metrics.TRAIN_LOSS], 4)
        if metrics.TRAIN_TOKENS_PER_SECOND in samples:
            progress["tokensPerSecond"] = round(samples[metrics.TRAIN_TOKENS_PER_SECOND], 1)
        if metrics.TRAIN_ETA in samples and math.isfinite(samples[metrics.TRAIN_ETA]):
            progress["eta"] = format_duration(samples[metrics.TRAIN_ETA])
        if samples.get(metrics.TRAIN_LAST_STEP_TIMESTAMP):
            progress["lastStepTime"] = format_time(samples[metrics.TRAIN_LAST_STEP_TIMESTAMP])
        peak = samples.get(metrics.memory_peak_key("allocated"))  # CPU: none, the RSS
        if peak is None:
            peak = samples.get(metrics.memory_peak_key("rss"))
        for key, value in (
            ("peakMemoryBytes", peak),
            ("memoryEstimateBytes", samples.get(metrics.TRAIN_MEMORY_ESTIMATE)),
            ("deviceMemoryBytes", samples.get(metrics.TRAIN_DEVICE_MEMORY)),
        ):
            if value is not None and math.isfinite(value) and value >= 0:
                progress[key] = int(value)
        progress["scrapeTime"] = format_time(self.progress.scraped_at)
        self.status.fields["progress"] = progress
        if samples.get(metrics.CHECKPOINT_LAST_STEP):
            step = int(samples[metrics.CHECKPOINT_LAST_STEP])
            uri = self.plan.public_uri(f"{self.plan.output_uri}/{layout.checkpoint_path(step)}")
            self.status.fields["checkpoint"] = {"step": step, "uri": uri}

    def heartbeat(self, stage: Stage, child: ChildState) -> float | None:
        """Last sign of progress: the stage's heartbeat series (fresh, or for training also the
        remembered last-step time), else when the child started running. A scrape older than
        the child's start (an earlier stage or attempt) cannot hide a fresh start: the newest
        wins."""
        role = ROLES[stage.role]
        beats = [child.running_since]
        if role.stall is not None and self.progress is not None:
            beats.append(self.progress.samples.get(role.stall.heartbeat) or None)
        if role.reports_progress and self.history:
            remembered = parse_time((self.status.fields.get("progress") or {}).get("lastStepTime"))
            started = parse_time(self.history[-1].get("startTime"))
            if remembered is not None and (started is None or remembered >= started):
                beats.append(remembered)
        known = [b for b in beats if b is not None]
        return max(known) if known else None

    def stalled(self, stage: Stage, child: ChildState) -> bool:
        """No progress for spec.stallTimeout, for a role with a heartbeat."""
        if ROLES[stage.role].stall is None or child.phase != "running" or self.spec.suspend:
            return False
        beat = self.heartbeat(stage, child)
        timeout = duration_seconds(self.spec.stall_timeout)
        return beat is not None and self.status.now - beat > timeout

    def stall_message(self, stage: Stage, child: ChildState) -> str:
        stall = ROLES[stage.role].stall
        assert stall is not None  # stalled() said so
        beat = self.heartbeat(stage, child) or self.status.now
        return (
            f"{child.name}: no {stall.progress} for {format_duration(self.status.now - beat)} "
            f"(stallTimeout {self.spec.stall_timeout}){stall.remedy}"
        )

    def progress_message(self) -> str:
        progress = self.status.fields.get("progress") or {}
        if progress.get("step") is None:
            return ""
        total = progress.get("totalSteps")
        text = f"step {progress['step']}" + (f"/{total}" if total else "")
        return text + (f", loss {progress['loss']}" if progress.get("loss") is not None else "")


#: The Job controller's reason on the Failed condition of a Job past activeDeadlineSeconds.
JOB_DEADLINE_EXCEEDED = "DeadlineExceeded"


def _numbers(report: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("firstLoss", "lastLoss", "lossDrop", "maxGradNorm", "steps")
    return {
        k: report[k]
        for k in keys
        if isinstance(report.get(k), int | float) and math.isfinite(report[k])
    }


#: A rung whose measured peak exceeds this share of its GPU warns in its condition message.
MEMORY_WARNING_SHARE = 0.95


def _measured(result: Mapping[str, Any]) -> dict[str, Any]:
    """A train or sanity result's measured figures, as status.sanity[] and status.progress name
    them: the peak is the GPU's allocated peak, or the process's peak RSS on CPU."""
    peak = result.get("memoryPeakAllocatedBytes")
    if not _count(peak):
        peak = result.get("memoryPeakRssBytes")
    figures = {
        "peakMemoryBytes": peak,
        "peakReservedBytes": result.get("memoryPeakReservedBytes"),
        "memoryEstimateBytes": result.get("memoryEstimateBytes"),
        "deviceMemoryBytes": result.get("deviceMemoryBytes"),
    }
    measured: dict[str, Any] = {k: v for k, v in figures.items() if _count(v)}
    speed = result.get("tokensPerSecond")
    if isinstance(speed, int | float) and math.isfinite(speed) and speed >= 0:
        measured["tokensPerSecond"] = round(float(speed), 1)
    return measured


def _count(value: object) -> TypeGuard[int]:
    """A byte count: a non-negative int (bool and floats are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def memory_warning(result: Mapping[str, Any], rung_path: str) -> str:
    """The warning of a rung whose peak (what the GPU had to hold: reserved, else allocated)
    passed MEMORY_WARNING_SHARE of its GPU, with the figures and the way out; else ""."""
    device, allocated = result.get("deviceMemoryBytes"), result.get("memoryPeakAllocatedBytes")
    reserved = result.get("memoryPeakReservedBytes")
    peak = reserved if _count(reserved) else allocated
    if not (_count(device) and device > 0 and _count(peak)):
        return ""
    if peak <= MEMORY_WARNING_SHARE * device:
        return ""
    held = f"peak {gib(peak)}" + (
        f" reserved ({gib(allocated)} allocated)" if peak is reserved and _count(allocated) else ""
    )
    estimate = result.get("memoryEstimateBytes")
    estimated = f", estimated {gib(estimate)}" if _count(estimate) else ""
    return (
        f" — warning: {held} of the GPU's {gib(device)} ({peak / device:.0%}){estimated}: the "
        "full run may run out of memory on a longer batch — set "
        "spec.training.gradientCheckpointing: true, or lower spec.training.microBatchSize "
        f"(this rung: {rung_path}.microBatchSize)"
    )


def _fit(rows: Any) -> list[dict[str, Any]]:
    """status.fit from the preprocess result's fit table (memory.row lines), FIT_ROWS at most,
    `largest` as named terms. A row the status model refuses is left out rather than making
    the whole status patch invalid: the result is only the trainer's word."""
    fit = []
    for row in rows[:FIT_ROWS] if isinstance(rows, list) else []:
        if not isinstance(row, Mapping):
            continue
        largest = [
            {"name": term[0], "bytes": term[1]}
            for term in row.get("largest") or []
            if isinstance(term, list | tuple) and len(term) == 2
        ]
        try:
            valid = FitRow.model_validate({**row, "largest": largest})
        except ValidationError:
            continue
        fit.append(valid.model_dump(mode="json", by_alias=True, exclude_none=True))
    return fit


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
    sources = _sources(result.get("sources"))
    if sources:
        dataset["sources"] = sources
    return {k: v for k, v in dataset.items() if v is not None}


def _sources(entries: Any) -> list[dict[str, Any]]:
    """status.dataset.sources from the preprocess result's per-source accounting, SOURCE_ROWS at
    most. Validated strictly ("12" or true is not a count): an entry the status model refuses is
    left out rather than making the whole status patch invalid, as for _fit."""
    sources = []
    for entry in entries[:SOURCE_ROWS] if isinstance(entries, list) else []:
        try:
            valid = SourceStatus.model_validate(entry, strict=True)
        except ValidationError:
            continue
        sources.append(valid.model_dump(mode="json", by_alias=True, exclude_none=True))
    return sources


@dataclass(frozen=True)
class StallCheck:
    """A running child without progress for spec.stallTimeout is deleted (training: and a new
    attempt starts; a Job stage: the run fails)."""

    heartbeat: str
    """The series the stage exports: Unix time of its last progress (kubetrain_contract.metrics)."""
    progress: str
    """What was missing, for the message ("no <progress> for 16m")."""
    remedy: str = ""
    """What to do, appended to the message (training restarts on its own)."""


@dataclass(frozen=True)
class Role:
    """How the lifecycle handles the stages of one role: the one place a role's behaviour is
    looked up, so a new role is a new row, not a new branch in every method."""

    phase: str
    """status.phase while a stage of this role runs."""
    reason: str
    """Ready's reason while its child starts and runs."""
    walk: Callable[[Lifecycle, Stage], bool]
    """One step of the stage; True when it is done (job stages run once, train has attempts)."""
    pending: Callable[[Lifecycle, Stage], None] | None = None
    """The stage condition it drives while its child starts or runs."""
    succeeded: Callable[[Lifecycle, Stage, Mapping[str, Any]], None] | None = None
    """What its result (the termination message) writes into status."""
    failed: Callable[[Lifecycle, Stage, ChildState, str], tuple[str, str]] | None = None
    """Its failure's reason and message (None: by exit code, Lifecycle.exit_failure)."""
    reports_progress: bool = False
    """Its waiting summary shows the training step, and a pending child reads Starting."""
    stall: StallCheck | None = None
    """Its progress check (None: none; merge exports no progress, stageDeadline bounds it)."""
    condition: str | None = None
    """The stage condition it drives, set False with the run's reason when it stalls."""
    scraped: bool = False
    """The operator scrapes the run's metrics Service while a pod of this role runs."""


ROLES: Mapping[StageRole, Role] = {
    "preprocess": Role(
        P_PREPROCESSING,
        R_PREPROCESSING,
        Lifecycle.job_stage,
        pending=Lifecycle.preprocess_pending,
        succeeded=Lifecycle.preprocess_succeeded,
        failed=Lifecycle.preprocess_failed,
        stall=StallCheck(
            metrics.PREPROCESS_LAST_PROGRESS_TIMESTAMP,
            "preprocessing progress",
            " — no input was read or encoded for that long (a hung read, a stuck worker); the "
            "Job was deleted. Raise spec.stallTimeout if a step without reads takes longer "
            "(fingerprinting large local inputs, tokenizer merges); any change of the spec runs "
            "the stage again",
        ),
        condition=DATA_READY,
        scraped=True,
    ),
    "sanity": Role(
        P_SANITY,
        R_SANITY_RUNNING,
        Lifecycle.job_stage,
        pending=Lifecycle.sanity_pending,
        succeeded=Lifecycle.sanity_succeeded,
        failed=Lifecycle.sanity_failed,
        scraped=True,
    ),
    "train": Role(
        P_TRAINING,
        R_TRAINING,
        Lifecycle.train,
        reports_progress=True,
        stall=StallCheck(metrics.TRAIN_LAST_STEP_TIMESTAMP, "training step"),
        scraped=True,
    ),
    "merge": Role(P_MERGING, R_MERGING, Lifecycle.job_stage, succeeded=Lifecycle.merge_succeeded),
}

#: The roles whose running pods the operator scrapes (reconcile matches the pods' role label).
SCRAPED_ROLES: frozenset[str] = frozenset(name for name, role in ROLES.items() if role.scraped)
