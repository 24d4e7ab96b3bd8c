"""The only module that talks to the API server (besides Kopf's own watching and posting).

Every call here has an RBAC rule in `permissions.py`; `CALLS` names them so a test can compare the
two. The Kubernetes client is synchronous: calls run in worker threads with a connection pool sized
for many runs at once. The kubeconfig (or the in-cluster service account) decides where they go.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

#: kind → plural of every object the operator writes.
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "TrainingRun": "trainingruns",
}

#: (verb, group, resource) of every request this module makes — each must be in permissions.py.
CALLS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("create", "", "configmaps"),
        ("patch", "", "configmaps"),
        ("create", "", "services"),
        ("create", "", "serviceaccounts"),
        ("create", "batch", "jobs"),
        ("patch", "batch", "jobs"),
        ("create", "kubeflow.org", "pytorchjobs"),
        ("patch", "kubeflow.org", "pytorchjobs"),
        ("delete", "kubeflow.org", "pytorchjobs"),
        ("patch", "kubetrain.dev", "trainingruns/status"),
    }
)

REQUEST_TIMEOUT = 30.0
#: Connections to the API server (and threads that make the synchronous calls).
POOL_SIZE = 8
#: Order of the queued calls: a run's status (what `kubectl get` and `kubectl wait` show) first.
STATUS, CHILD = 0, 1


class ApiError(Exception):
    """An API call failed; `permanent` when retrying the same request cannot help (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.permanent = 400 <= status < 500 and status not in (408, 409, 429)


def load_configuration(pool_size: int = POOL_SIZE) -> Any:
    """The in-cluster service account, else the kubeconfig (KUBECONFIG / ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return configuration


def _path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


class _Calls:
    """Threads for the synchronous client, taking queued calls by priority, then in order: when
    hundreds of runs are applied at once, a run's status patch does not wait behind the other
    runs' child creates (a FIFO pool made a Job's completion show in the run seconds late in
    bench/operator.py). The standard library's thread pool has no priorities."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Any]] = (
            queue.PriorityQueue()
        )
        self._order = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"k8s-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, priority: int, call: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((priority, next(self._order), call, future))
        return await asyncio.wrap_future(future)

    def _work(self) -> None:
        while True:
            _, _, call, future = self._queue.get()
            if call is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as error:  # handed to the awaiting coroutine
                future.set_exception(error)

    def close(self) -> None:
        """After the calls already queued."""
        for _ in self._threads:
            self._queue.put((CHILD + 1, next(self._order), None, None))


class Cluster:
    """Create-if-absent, patch and delete of a run's children; status patches of runs."""

    def __init__(self, configuration: Any) -> None:
        self.api = client.ApiClient(configuration)
        self._calls = _Calls(POOL_SIZE)

    def close(self) -> None:
        self._calls.close()
        self.api.close()

    async def _run(self, priority: int, *args: Any) -> dict[str, Any]:
        return cast(
            dict[str, Any], await self._calls.run(priority, functools.partial(self._call, *args))
        )

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        try:
            response = self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as error:
            raise ApiError(error.status or 0, _reason(error)) from None
        data = response[0].data if isinstance(response, tuple) else response.data
        return json.loads(data) if data else {}

    async def create(self, body: Mapping[str, Any]) -> str | None:
        """The new object's resourceVersion, or None when one of that name already exists."""
        meta = body["metadata"]
        path = _path(body["apiVersion"], PLURALS[body["kind"]], meta["namespace"])
        try:
            created = await self._run(CHILD, "POST", path, dict(body))
        except ApiError as error:
            if error.status == 409:
                return None
            raise
        return str((created.get("metadata") or {}).get("resourceVersion") or "")

    async def update_data(self, body: Mapping[str, Any]) -> None:
        """Bring an existing ConfigMap's data up to date (merge patch)."""
        meta = body["metadata"]
        path = _path(body["apiVersion"], PLURALS[body["kind"]], meta["namespace"], meta["name"])
        patch = {"data": body.get("data") or {}}
        await self._run(CHILD, "PATCH", path, patch, "application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete in the background (pods follow by owner reference); False if already gone."""
        path = _path(api_version, PLURALS[kind], namespace, name)
        options = {"propagationPolicy": "Background"}
        try:
            await self._run(CHILD, "DELETE", path, options)
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def set_suspend(
        self, api_version: str, kind: str, namespace: str, name: str, suspend: bool
    ) -> None:
        """Job: spec.suspend; PyTorchJob: spec.runPolicy.suspend (merge patch)."""
        path = _path(api_version, PLURALS[kind], namespace, name)
        spec: dict[str, Any] = (
            {"suspend": suspend} if kind == "Job" else {"runPolicy": {"suspend": suspend}}
        )
        await self._run(CHILD, "PATCH", path, {"spec": spec}, "application/merge-patch+json")

    async def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], removed: list[str]
    ) -> dict[str, Any]:
        """Merge-patch the run's status subresource with the top-level fields that changed;
        `removed` top-level keys are nulled. The answer is the whole run as stored."""
        path = _path("kubetrain.dev/v1alpha1", "trainingruns", namespace, name) + "/status"
        patch = {"status": {**dict(status), **dict.fromkeys(removed)}}
        return await self._run(STATUS, "PATCH", path, patch, "application/merge-patch+json")


def post_event(run: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """An event on the run, through Kopf's poster (queued, non-blocking)."""
    kopf.event(kopf.Body(cast(kopf.RawBody, dict(run))), type=type_, reason=reason, message=message)


def adopt(body: dict[str, Any], run: Mapping[str, Any]) -> None:
    """Owner reference to the run (garbage collection deletes children with it)."""
    kopf.adopt(body, owner=kopf.Body(cast(kopf.RawBody, dict(run))))


def _reason(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)
