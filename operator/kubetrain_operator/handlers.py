"""Kopf handlers: thin glue. Indexes keep runs, children and pods in memory; every event and the
resync timer only poke the run's reconcile (reconcile.py), which does the work."""

from __future__ import annotations

from typing import Any

import kopf

from kubetrain_operator.api import API_GROUP, API_VERSION, PLURAL
from kubetrain_operator.reconcile import Indexes, Reconciler, run_key
from kubetrain_operator.render import LABEL_RUN
from kubetrain_operator.settings import OperatorSettings

#: Read once at import: the timer's interval is fixed when the handler is registered.
SETTINGS = OperatorSettings.from_env()
RUN = (API_GROUP, API_VERSION, PLURAL)
CHILD_FILTER = {LABEL_RUN: kopf.PRESENT}


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.get("metadata", {})),
        "spec": dict(body.get("spec", {})),
        "status": dict(body.get("status", {})),
    }


def _pod(body: kopf.Body) -> dict[str, Any]:
    """What status.py reads of a pod: labels, phase, container states."""
    meta = body.get("metadata", {})
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels", {}))},
        "status": dict(body.get("status", {})),
    }


@kopf.index(*RUN)
async def runs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace or "", name): _plain(body)}


def _child_changed(
    memo: kopf.Memo, namespace: str | None, labels: kopf.Labels, body: kopf.Body
) -> None:
    """A child's or pod's event pokes its run from the index handler itself: one Kopf handler per
    child event, not an index and an on.event handler (Kopf's per-handler cost was a quarter of
    the operator's CPU under a burst, bench/operator.py). Kopf stores the index entry right after
    the handler returns, before the poked reconcile can run. Until a run or timer handler has
    run, Kopf is still filling the indexes at start-up: nothing is poked then (every run is
    reconciled once its own start-up event arrives, with the indexes full)."""
    reconciler: Reconciler = memo.reconciler
    key = run_key(labels, namespace or "")
    if reconciler.indexes is not None and key is not None:
        meta = body.get("metadata", {})
        child = (f"{body.get('kind')}/{meta.get('name')}", str(meta.get("resourceVersion")))
        reconciler.poke(key, scrape=True, child=child)


@kopf.index("batch", "v1", "jobs", labels=CHILD_FILTER)
async def run_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> dict[Any, Any]:
    _child_changed(memo, namespace, labels, body)
    return {(namespace or "", labels[LABEL_RUN]): _plain(body)}


@kopf.index("kubeflow.org", "v1", "pytorchjobs", labels=CHILD_FILTER)
async def run_pytorchjobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> dict[Any, Any]:
    _child_changed(memo, namespace, labels, body)
    return {(namespace or "", labels[LABEL_RUN]): _plain(body)}


@kopf.index("", "v1", "pods", labels=CHILD_FILTER)
async def run_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> dict[Any, Any]:
    _child_changed(memo, namespace, labels, body)
    return {(namespace or "", labels[LABEL_RUN]): _pod(body)}


def _reconciler(memo: kopf.Memo, kwargs: dict[str, Any]) -> Reconciler:
    reconciler: Reconciler = memo.reconciler
    if reconciler.indexes is None:
        reconciler.indexes = Indexes(
            runs=kwargs["runs"],
            jobs=kwargs["run_jobs"],
            pytorchjobs=kwargs["run_pytorchjobs"],
            pods=kwargs["run_pods"],
        )
    return reconciler


@kopf.on.event(*RUN)
async def run_changed(
    namespace: str | None, name: str, meta: kopf.Meta, memo: kopf.Memo, **kwargs: Any
) -> None:
    reconciler = _reconciler(memo, kwargs)
    reconciler.poke((namespace or "", name), version=meta.get("resourceVersion"))
    reconciler.poke_dependents((namespace or "", name))


@kopf.timer(*RUN, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
async def resync(namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    """Repairs a missed event and polls progress; the scrape itself is rate-limited."""
    _reconciler(memo, kwargs).poke((namespace or "", name))
