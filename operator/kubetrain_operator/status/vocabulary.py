"""The words of a run's status: condition types, reasons, phases — what users, `kubectl wait`,
GitOps health checks and alerts match on, so they change only with the CRD's docs."""

from __future__ import annotations

from typing import Literal

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
R_DOES_NOT_FIT = "DoesNotFit"  # a stage's memory estimate exceeds its GPU (docs/fit.md)
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
R_DEADLINE_EXCEEDED = "DeadlineExceeded"  # a Job stage ran past spec.stageDeadline
R_SUSPENDED = "Suspended"
R_QUEUED = "Queued"
R_STARTING = "Starting"

# Phases (status.phase, for humans and printer columns).
P_PENDING, P_PREPROCESSING, P_SANITY, P_TRAINING = "Pending", "Preprocessing", "Sanity", "Training"
P_MERGING, P_SUCCEEDED, P_FAILED, P_SUSPENDED = "Merging", "Succeeded", "Failed", "Suspended"

#: Attempt reasons: the `reason` label of kubetrain_operator_run_attempts_total (metrics.md).
AttemptReason = Literal["initial", "failure", "stall"]

#: Reasons whose transitions are Warning events (the rest are Normal).
WARNING_REASONS = frozenset(
    {
        R_INVALID_SPEC,
        R_DOES_NOT_FIT,
        R_UPSTREAM_FAILED,
        R_SANITY_FAILED,
        R_INVALID_INPUT,
        R_UNHEALTHY,
        R_STAGE_FAILED,
        R_RESTARTS_EXHAUSTED,
        R_DEADLINE_EXCEEDED,
        R_PROGRESS_STALLED,
    }
)
