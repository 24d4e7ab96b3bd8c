"""One reconcile per run at a time: read the caches, derive, patch the status, act.

Every trigger — the run's own events, its children's and pods' events, the resync timer, a backoff
wake-up — pokes the same per-run queue entry. Pokes that arrive while a reconcile runs coalesce into
one more pass, so a burst of child events costs one status patch. The world is read from Kopf's
in-memory indexes (no GETs); the status this operator wrote last is preferred over a cached run body
that has not caught up with it yet.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kubetrain_operator import k8s
from kubetrain_operator.operator_metrics import OperatorMetrics
from kubetrain_operator.progress import Endpoints, scrape
from kubetrain_operator.render import LABEL_COMPONENT, LABEL_RUN, child_name
from kubetrain_operator.settings import OperatorSettings
from kubetrain_operator.status import (
    SCRAPED_ROLES,
    DeleteObject,
    EnsureObject,
    Progress,
    RecordEvent,
    RequeueAfter,
    SetSuspend,
    derive_status,
    pod_terminated,
    redact,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]
ERROR_BACKOFF_MAX = 30.0
#: Longest an event waits for a moment between reconciles before it is posted anyway.
EVENT_DELAY_MAX = 5.0
#: How long an object this process created (or found existing) is trusted to exist without
#: asking again: covers the watch lag until the indexes show it; after that, level-based again.
EXPECTATION_SECONDS = 60.0


@dataclass
class Indexes:
    """Kopf's live indexes, keyed by (namespace, run name)."""

    runs: Mapping[Key, Iterable[dict[str, Any]]]
    jobs: Mapping[Key, Iterable[dict[str, Any]]]
    pytorchjobs: Mapping[Key, Iterable[dict[str, Any]]]
    pods: Mapping[Key, Iterable[dict[str, Any]]]


@dataclass
class _Entry:
    dirty: bool = False
    scrape: bool = False
    task: asyncio.Task[None] | None = None
    wake: asyncio.TimerHandle | None = None
    wake_at: float = 0.0
    errors: int = 0
    progress: Progress | None = None
    scraped_at: float = 0.0
    written: tuple[str, dict[str, Any]] | None = None
    written_version: str | None = None
    """resourceVersion of the run as this process last wrote it: its own echo needs no pass."""
    uid: str | None = None
    expected: dict[str, tuple[float, str]] = field(default_factory=dict)
    """name → (when, digest of what was ensured): creates this process need not repeat."""
    created: dict[str, str] = field(default_factory=dict)
    """"Kind/name" → resourceVersion of a child as this process created it: the watch's echo of
    the create needs no pass (derive_status already reported a just-created child as starting)."""


def metrics_service(run_name: str) -> str:
    """The run's metrics Service (render.metrics_service_name; a test keeps the two equal)."""
    return child_name(run_name, "metrics")


def _items(index: Mapping[Key, Iterable[dict[str, Any]]], key: Key) -> list[dict[str, Any]]:
    try:
        return list(index[key])
    except KeyError:
        return []


@dataclass
class Reconciler:
    cluster: k8s.Cluster
    settings: OperatorSettings
    metrics: OperatorMetrics
    endpoints: Endpoints = field(default_factory=Endpoints.from_env)
    indexes: Indexes | None = None
    session: aiohttp.ClientSession | None = None
    _entries: dict[Key, _Entry] = field(default_factory=dict)
    _dependents: dict[Key, set[Key]] = field(default_factory=dict)
    _active: int = 0
    """Reconciles running now."""
    _events: collections.deque[tuple[float, dict[str, Any], RecordEvent]] = field(
        default_factory=collections.deque
    )
    _event_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------- triggering
    def poke(
        self,
        key: Key,
        *,
        scrape: bool = False,
        delay: float = 0.0,
        version: str | None = None,
        child: tuple[str, str] | None = None,
    ) -> None:
        """Reconcile `key` now (or after `delay` seconds); repeated pokes coalesce. `version`: the
        run's resourceVersion when its own event pokes — the echo of our status write is skipped;
        `child`: ("Kind/name", resourceVersion) of a child's event — the echo of our create too."""
        entry = self._entries.setdefault(key, _Entry())
        if version is not None and version == entry.written_version:
            return
        if child is not None and entry.created.get(child[0]) == child[1]:
            return
        loop = asyncio.get_running_loop()
        if delay > 0:
            at = loop.time() + delay
            if entry.wake is not None and entry.wake_at <= at and not entry.wake.cancelled():
                return
            if entry.wake is not None:
                entry.wake.cancel()
            entry.wake_at = at
            entry.wake = loop.call_later(delay, self._wake, key)
            return
        entry.dirty = True
        entry.scrape = entry.scrape or scrape
        if entry.task is None or entry.task.done():
            entry.task = asyncio.create_task(self._drain(key), name=f"reconcile {key[0]}/{key[1]}")

    def _wake(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.wake = None
        self.poke(key)

    def poke_dependents(self, key: Key) -> None:
        """Runs chained to `key` (model.fromRun) learn at once that their parent changed."""
        for dependent in sorted(self._dependents.get(key, ())):
            self.poke(dependent)

    def tracked(self) -> int:
        """Runs this operator has reconciled and still holds state for."""
        return len(self._entries)

    async def idle(self) -> None:
        """Wait until no reconcile is running (tests, shutdown)."""
        while tasks := [e.task for e in self._entries.values() if e.task and not e.task.done()]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, key: Key) -> None:
        entry = self._entries[key]
        self._active += 1
        try:
            await self._passes(key, entry)
        finally:
            self._active -= 1

    async def _passes(self, key: Key, entry: _Entry) -> None:
        while entry.dirty:
            entry.dirty = False
            scrape_now, entry.scrape = entry.scrape, False
            try:
                await self.reconcile(key, scrape_now)
                entry.errors = 0
            except k8s.ApiError as error:
                kind = "permanent" if error.permanent else "temporary"
                self._failed(key, entry, kind, redact(str(error)))
            except Exception as error:  # a bug must not stop the other runs' reconciles
                log.exception("reconcile of %s/%s failed", *key)
                self._failed(key, entry, "temporary", redact(repr(error)))

    def _failed(self, key: Key, entry: _Entry, kind: str, message: str) -> None:
        self.metrics.errors.labels(kind).inc()
        entry.errors += 1
        delay = min(ERROR_BACKOFF_MAX, 0.5 * 2 ** (entry.errors - 1))
        log.warning("reconcile of %s/%s: %s error: %s; retry in %.1fs", *key, kind, message, delay)
        self.poke(key, delay=delay)

    # ------------------------------------------------------------------------------ reconcile
    def _run(self, key: Key) -> dict[str, Any] | None:
        assert self.indexes is not None
        bodies = _items(self.indexes.runs, key)
        if not bodies:
            return None
        body = bodies[0]
        entry = self._entries.get(key)
        uid = (body.get("metadata") or {}).get("uid", "")
        if entry is not None and entry.written is not None and entry.written[0] == uid:
            body = {**body, "status": entry.written[1]}
        return body

    async def reconcile(self, key: Key, scrape_now: bool = False) -> None:
        if self.indexes is None:
            return  # no handler has run yet: nothing is cached
        run = self._run(key)
        if run is None:
            self._forget(key)
            return
        meta = run.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return  # children go with it (owner references); nothing to start
        uid = meta.get("uid")
        entry = self._entries.setdefault(key, _Entry())
        if entry.uid != uid:  # a new run of the same name: nothing is known about it
            entry.uid, entry.expected, entry.created = uid, {}, {}
        children = [
            c
            for c in _items(self.indexes.jobs, key) + _items(self.indexes.pytorchjobs, key)
            if any(
                o.get("uid") == uid for o in (c.get("metadata") or {}).get("ownerReferences") or []
            )
        ]
        pods = _items(self.indexes.pods, key)
        progress = await self._progress(key, pods, scrape_now)
        upstream = None
        parent = ((run.get("spec") or {}).get("model") or {}).get("fromRun")
        if isinstance(parent, str):
            parent_key = (key[0], parent)
            self._dependents.setdefault(parent_key, set()).add(key)
            upstream = self._run(parent_key)
        status, actions = derive_status(
            run,
            children,
            pods,
            progress,
            time.time(),
            upstream=upstream,
            timing=self.settings.timing,
            defaults=self.settings.defaults,
        )
        old = run.get("status") or {}
        if status != old:
            removed = [k for k in old if k not in status]
            changed = {k: v for k, v in status.items() if old.get(k) != v}
            updated = await self.cluster.patch_status(key[0], key[1], changed, removed)
            written = updated.get("status")
            entry.written = (str(uid), written if isinstance(written, dict) else status)
            entry.written_version = (updated.get("metadata") or {}).get("resourceVersion")
        self.metrics.set_phase(key, status.get("phase"))
        for action in actions:
            await self._execute(key, run, action)

    async def _execute(self, key: Key, run: dict[str, Any], action: object) -> None:
        if isinstance(action, EnsureObject):
            body = {**action.body, "metadata": dict(action.body["metadata"])}
            entry = self._entries.setdefault(key, _Entry())
            name = f"{body['kind']}/{body['metadata']['name']}"
            digest = json.dumps(body.get("data"), sort_keys=True) if action.update else ""
            known = entry.expected.get(name)
            if known and time.monotonic() - known[0] < EXPECTATION_SECONDS and known[1] == digest:
                return
            if action.owned:
                k8s.adopt(body, run)
            created = await self.cluster.create(body)
            if created is None and action.update:
                await self.cluster.update_data(body)
            entry.expected[name] = (time.monotonic(), digest)
            if created is not None:
                entry.created[name] = created
                log.info("%s/%s: created %s %s", *key, body["kind"], body["metadata"]["name"])
                if action.attempt_reason is not None:
                    self.metrics.attempts.labels(action.attempt_reason).inc()
        elif isinstance(action, DeleteObject):
            deleted = await self.cluster.delete(
                action.api_version, action.kind, key[0], action.name
            )
            if deleted:
                log.info("%s/%s: deleted %s %s (%s)", *key, action.kind, action.name, action.why)
                if action.why == "stalled":
                    self.metrics.stalls.inc()
        elif isinstance(action, SetSuspend):
            await self.cluster.set_suspend(
                action.api_version, action.kind, key[0], action.name, action.suspend
            )
        elif isinstance(action, RecordEvent):
            self._events.append((time.monotonic(), run, action))
            if self._event_task is None or self._event_task.done():
                self._event_task = asyncio.create_task(self._post_events(), name="events")
        elif isinstance(action, RequeueAfter):
            self.poke(key, delay=action.seconds)

    async def _post_events(self) -> None:
        """Events go to Kopf's poster between reconciles, or once EVENT_DELAY_MAX has passed:
        under a burst the status patches (what `kubectl get`/`wait` show) go first, and the events
        (best-effort in Kubernetes; two of a run change's four requests) follow. In order."""
        while self._events:
            queued_at, run, event = self._events[0]
            if self._active and time.monotonic() - queued_at < EVENT_DELAY_MAX:
                await asyncio.sleep(0.05)
                continue
            self._events.popleft()
            k8s.post_event(run, event.type, event.reason, event.message)

    async def _progress(
        self, key: Key, pods: list[dict[str, Any]], scrape_now: bool
    ) -> Progress | None:
        """The latest scrape; a new one when a pod of a scraped role (preprocess: its heartbeat;
        sanity, train: their steps) runs and one is due."""
        entry = self._entries.setdefault(key, _Entry())
        running = any(
            ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_COMPONENT) in SCRAPED_ROLES
            and (p.get("status") or {}).get("phase") == "Running"
            and not pod_terminated(p)
            for p in pods
        )
        due = time.monotonic() - entry.scraped_at >= self.settings.progress_seconds
        if running and (scrape_now or due):
            if self.session is None:
                self.session = aiohttp.ClientSession()
            port = self.settings.defaults.metrics_port
            url = self.endpoints.url(key[0], metrics_service(key[1]), port)
            entry.scraped_at = time.monotonic()
            fresh = await scrape(self.session, url)
            if fresh is not None:
                entry.progress = fresh
        return entry.progress

    def _forget(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.wake is not None:
            entry.wake.cancel()
        self.metrics.set_phase(key, None)
        for dependents in self._dependents.values():
            dependents.discard(key)

    async def close(self) -> None:
        """At shutdown. Events still waiting are dropped, as Kopf's own queue drops its own (its
        poster has stopped by now; events are best-effort in Kubernetes)."""
        if self._event_task is not None:
            self._event_task.cancel()
        if self._events:
            log.info("stopping: %d events not posted", len(self._events))
        if self.session is not None:
            await self.session.close()
        self.cluster.close()


def run_key(labels: Mapping[str, str], namespace: str) -> Key | None:
    """The run a child or pod belongs to, from its kubetrain.dev/run label."""
    name = labels.get(LABEL_RUN)
    return (namespace, name) if name else None
