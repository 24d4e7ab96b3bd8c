"""The operator process:

    kopf run --standalone -m kubetrain_operator.main --all-namespaces   # or --namespace NS
    kubetrain operator [--namespace NS]                                  # the same

Peering: off (`--standalone`). Run one replica (the chart uses the Recreate strategy); two
operators would still never create two trainers (names are deterministic and creation is
create-if-absent), but they would reconcile everything twice. All Kopf settings are here, in one
startup handler; the operator's own settings come from the environment (settings.py).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from typing import Any

import kopf

from kubetrain_operator import handlers, k8s
from kubetrain_operator.api import API_GROUP
from kubetrain_operator.operator_metrics import OperatorMetrics
from kubetrain_operator.reconcile import Reconciler

__all__ = ["NoDiffBase", "configure", "handlers", "probe_runs", "shutdown"]

FINALIZER = f"{API_GROUP}/finalizer"
#: The cyclic garbage collector's thresholds. The operator holds every run, child and pod in
#: Kopf's indexes, and a watch event allocates thousands of objects: at Python's default (700) the
#: collector's passes over that heap were a third of the operator's CPU under bench/operator.py's
#: burst. Reference counting frees the JSON bodies anyway; only cycles wait for a pass. What is
#: loaded at start-up (modules, classes: most of the heap then) is frozen out of every pass.
GC_THRESHOLDS = (50_000, 20, 10)
WORKER_IDLE_SECONDS = 300.0


class NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled state: the operator is level-based (no on.create/update/field handlers,
    nothing diffs an object against what was handled before), yet Kopf would build that state for
    every watch event, a deep copy of the whole object: a fifth of its per-event CPU under load
    (bench/operator.py). Every object's essence is empty, so there is never a diff."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Nothing to keep."""


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = handlers.SETTINGS
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    # Our own finalizer and annotation prefix (Kopf's defaults are under kopf.zalando.org).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # Only warnings and errors of Kopf's own log become events; ours are posted explicitly.
    settings.posting.level = logging.WARNING
    # Kopf logs a success line per handler per watch event (the index and timer handlers see
    # every run): that would be most of the log. Failures are still logged; `--verbose` shows all.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Kopf's per-object worker outlives a quiet object for this long (default 5 s): a run's
    # children change again within minutes, and starting a worker anew costs more than its
    # event (bench/operator.py). One idle task per object meanwhile.
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS
    # Watches: the server ends a watch after this long; the client gives up a little later.
    settings.watching.server_timeout = ours.watch_server_timeout
    settings.watching.client_timeout = ours.watch_server_timeout + 30
    settings.watching.connect_timeout = 30
    # Peering: none (see the module docstring); `--standalone` says the same on the command line.
    settings.peering.standalone = True
    metrics = OperatorMetrics()
    if ours.metrics_port:
        metrics.serve(ours.metrics_port)
    memo.reconciler = Reconciler(k8s.Cluster(k8s.load_configuration()), ours, metrics)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler = memo.reconciler
    await reconciler.close()


@kopf.on.probe(id="runs")
async def probe_runs(memo: kopf.Memo, **_: Any) -> int:
    """The liveness endpoint (`--liveness=http://0.0.0.0:8080/healthz`) reports runs in memory."""
    reconciler: Reconciler = memo.reconciler
    return reconciler.tracked()
