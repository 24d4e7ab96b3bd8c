"""A run's children, their pods and the trainer's metrics → its status and next actions — pure.

`derive_status` is the whole decision logic of the operator: the handlers read the world, call it,
patch the status it returns and carry out its actions. It is level-based: the same inputs give the
same answer, so a repeated or missed event changes nothing. What must survive the loss of a child
(a Job removed by its TTL, a stalled attempt deleted) is remembered in the status itself:
`completedStages` and `attemptHistory`.

Ordering contract with the caller: patch the status first, then carry out the actions. A crash in
between leaves a status whose decisions the next reconcile repeats idempotently (creates answer
409, deletes 404), never a decision that is lost.

Here: the spec is parsed and planned (cached by content) and the upstream run checked; the walk
over the plan's stages is `lifecycle`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

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
from kubetrain_operator.fit import DoesNotFit
from kubetrain_operator.plan import Plan, plan_run
from kubetrain_operator.status.actions import Action
from kubetrain_operator.status.builder import StatusBuilder
from kubetrain_operator.status.lifecycle import Lifecycle
from kubetrain_operator.status.observation import Progress
from kubetrain_operator.status.timing import DEFAULT_TIMING, Timing
from kubetrain_operator.status.vocabulary import (
    P_FAILED,
    P_PENDING,
    R_DOES_NOT_FIT,
    R_INVALID_SPEC,
    R_UPSTREAM_FAILED,
    R_WAITING_FOR_UPSTREAM,
    SUCCEEDED,
)


def derive_status(
    run: Mapping[str, Any],
    children: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    progress: Progress | None,
    now: float,
    *,
    upstream: Mapping[str, Any] | None = None,
    timing: Timing = DEFAULT_TIMING,
    defaults: ClusterDefaults = NO_DEFAULTS,
) -> tuple[dict[str, Any], list[Action]]:
    """The run's new status and what to do next.

    `children`: the run's Jobs and PyTorchJobs (owned by it); `pods`: pods labelled with the run;
    `progress`: the latest scrape of its metrics Service (None: none yet); `upstream`: the run
    named by `model.fromRun` (None: not found); `now`: unix seconds; `defaults`: the cluster's
    defaults for what the spec leaves unset (the plan applies them).
    """
    meta = run.get("metadata") or {}
    builder = StatusBuilder(run.get("status") or {}, int(meta.get("generation") or 1), now)
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
    except DoesNotFit as error:
        builder.summary(P_FAILED, ("False", R_DOES_NOT_FIT, str(error)), "failed")
        return builder.build(), builder.actions
    except SpecError as error:
        builder.summary(P_FAILED, ("False", R_INVALID_SPEC, str(error)), "failed")
        return builder.build(), builder.actions
    by_name = {(c.get("metadata") or {}).get("name"): c for c in children}
    Lifecycle(parsed, plan, namespace, builder, by_name, pods, progress, timing).run()
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


def _upstream(builder: StatusBuilder, name: str, upstream: Mapping[str, Any] | None) -> str | None:
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
