"""The real operator process against the stand-in API server, and the controllers tests play.

`ApiServer` is standin's API server (a kmock KubernetesEmulator completed for Kopf: uid,
resourceVersion, generation, 409/422, status subresource, watches, finalizers, ownerReference GC,
CRD admission) with our CRD applied and the test namespace created, over real HTTP.
`OperatorProcess` is `python -m kopf run --standalone -m kubetrain_operator.main --namespace NS`
with its kubeconfig and test-sized timings. `Controllers` is the test's hand on the Job controller,
the Kubeflow training operator and the kubelet: the test says when a child's pods start, finish or
stop, and it writes over HTTP what standin/controllers.py says those controllers write (pods with
their labels and owner, pod and child status). `TrainerMetrics` serves the
trainer's progress series with prometheus-client on a real port, mapped to the run's metrics
Service through the operator's KUBETRAIN_METRICS_ENDPOINTS file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kubetrain_operator.crd import build_crd
from operator_support import NAMESPACE
from standin import StandIn, start_apiserver
from standin.apiserver import Call
from standin.controllers import job_status, pod_for, pod_status

ROOT = Path(__file__).resolve().parents[2]

#: Timings that make a lifecycle take seconds (docs/operator.md lists the variables).
FAST = {
    "KUBETRAIN_RESYNC_SECONDS": "1",
    "KUBETRAIN_PROGRESS_SECONDS": "0.5",
    "KUBETRAIN_BACKOFF_BASE_SECONDS": "0.5",
    "KUBETRAIN_BACKOFF_MAX_SECONDS": "2",
    "KUBETRAIN_WATCH_SERVER_TIMEOUT": "60",
}


TEST_AGENT = "kubetrain-tests/controllers"
GROUPS = {
    "trainingruns": "kubetrain.dev",
    "jobs": "batch",
    "pytorchjobs": "kubeflow.org",
    "pods": "",
    "configmaps": "",
    "services": "",
    "serviceaccounts": "",
    "events": "",
    "secrets": "",
}
T = TypeVar("T")


def path_of(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str = "") -> T:
    """Poll until `condition()` is truthy and return it; fail the test with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.05)


class ApiFailure(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"HTTP {code}: {text[:400]}")
        self.code = code


def crd_without_admission() -> dict[str, Any]:
    """Our CRD with an open schema: for benchmarks of the operator, where the stand-in's schema
    and CEL interpreters (~80 ms per TrainingRun write in cel-python) would be what is measured."""
    crd = build_crd()
    for version in crd["spec"]["versions"]:
        version["schema"] = {
            "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        }
    return crd


class PlayedKubelet:
    """Tells the stand-in which pods run (their status says so), so that deleting one is graceful:
    it stays, with a deletionTimestamp, until the test's kubelet (`Controllers.kubelet`) stops
    it — as in a cluster, where the kubelet takes terminationGracePeriodSeconds at most."""

    def is_running(self, pod: dict[str, Any]) -> bool:
        return (pod.get("status") or {}).get("phase") in ("Pending", "Running")

    def kill(self, pod: dict[str, Any], force: bool) -> None:
        """The test stops the pod itself."""

    def log(self, namespace: str | None, name: str) -> str:
        return ""


class ApiServer:
    """The stand-in API server with the TrainingRun CRD and the test namespace, in a thread of
    this process (tests read its store directly)."""

    def __init__(self, workdir: Path, crd: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.crd = crd if crd is not None else build_crd()
        self._context = start_apiserver(workdir)
        self.standin: StandIn | None = None

    def __enter__(self) -> ApiServer:
        self.standin = self._context.__enter__()
        self.standin.server.kubelet = PlayedKubelet()
        self.prepare()
        return self

    def prepare(self) -> None:
        """Our CRD and the test namespace, over HTTP as `kubectl apply` would send them."""
        self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", self.crd)
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)

    @property
    def url(self) -> str:
        assert self.standin is not None
        return self.standin.url

    @property
    def kubeconfig(self) -> Path:
        assert self.standin is not None
        return self.standin.kubeconfig

    def live(self, plural: str, namespace: str | None = NAMESPACE) -> list[dict[str, Any]]:
        assert self.standin is not None
        return self.standin.objects(GROUPS[plural], plural, namespace)

    def calls(self) -> list[Any]:
        assert self.standin is not None
        return self.standin.calls()

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", content_type)
        req.add_header("User-Agent", TEST_AGENT)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise ApiFailure(error.code, error.read().decode(errors="replace")) from None


class ApiServerProcess(ApiServer):
    """The same API server as a process of its own (`python -m standin --no-pods`), as a
    cluster's API server runs apart from its clients: for benchmarks, where sharing this
    process's interpreter lock with the load generator would slow the server being measured.
    Everything goes over HTTP; the call log comes from the stand-in's /standin/calls."""

    def __init__(self, workdir: Path, crd: dict[str, Any] | None = None) -> None:
        self.workdir = workdir / "apiserver"
        self.crd = crd if crd is not None else build_crd()
        self.proc: subprocess.Popen[str] | None = None
        self._url = ""
        self._calls: list[Any] = []

    def __enter__(self) -> ApiServerProcess:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "standin", "--no-pods", "--quiet"),
                *("--workdir", str(self.workdir)),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        kubeconfig = Path(self.proc.stdout.readline().strip())
        config = yaml.safe_load(kubeconfig.read_text())
        self._url = config["clusters"][0]["cluster"]["server"]
        self.prepare()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)

    @property
    def url(self) -> str:
        return self._url

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def live(self, plural: str, namespace: str | None = NAMESPACE) -> list[dict[str, Any]]:
        group = GROUPS[plural]
        version = "v1alpha1" if group == "kubetrain.dev" else "v1"
        path = path_of(f"{group}/{version}" if group else version, plural, namespace or "")
        if namespace is None:
            path = path.replace("/namespaces//", "/")
        return list(self.request("GET", path)["items"])

    def calls(self) -> list[Any]:
        """Every request so far; only the new ones cross the wire."""
        fresh = self.request("GET", f"/standin/calls?from={len(self._calls)}")
        self._calls += [Call(**c) for c in fresh]
        return list(self._calls)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """One operator process; `start` again after `kill` is a restart."""

    def __init__(self, api: ApiServer, workdir: Path, verbose: bool = True, **env: str) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.kubeconfig = api.kubeconfig
        self.endpoints = workdir / "metrics-endpoints.json"
        self.endpoints.write_text("{}", encoding="utf-8")
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETRAIN_METRICS_ENDPOINTS": str(self.endpoints),
            "KUBETRAIN_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")]
            ),
            "OMP_NUM_THREADS": "1",
            **FAST,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log = workdir / "operator.log"

    def start(self) -> OperatorProcess:
        self.starts += 1
        handle = self.log.open("ab")
        handle.write(f"\n===== start {self.starts} =====\n".encode())
        handle.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "--standalone",
                "-m",
                "kubetrain_operator.main",
                "--namespace",
                NAMESPACE,
                *(["--verbose"] if self.verbose else []),  # the chart runs it without
            ],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        handle.close()
        return self

    def kill(self) -> None:
        """A crash: SIGKILL, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def map_metrics(self, run: str, url: str) -> None:
        mapping = json.loads(self.endpoints.read_text(encoding="utf-8"))
        mapping[f"{NAMESPACE}/{run}-metrics"] = url
        self.endpoints.write_text(json.dumps(mapping), encoding="utf-8")


class TrainerMetrics:
    """The trainer's progress series (metrics.md names), served by prometheus-client."""

    def __init__(self, run: str) -> None:
        self.registry = CollectorRegistry()
        self.run = run
        names = {
            "step": "kubetrain_train_step",
            "total": "kubetrain_train_total_steps",
            "loss": "kubetrain_train_loss",
            "tps": "kubetrain_train_tokens_per_second",
            "eta": "kubetrain_train_eta_seconds",
            "last": "kubetrain_train_last_step_timestamp_seconds",
            "checkpoint": "kubetrain_checkpoint_last_step",
        }
        self.gauges = {
            k: Gauge(v, v, ["run"], registry=self.registry).labels(run) for k, v in names.items()
        }
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, "127.0.0.1", self.registry)
        self.url = f"http://127.0.0.1:{self.port}/metrics"

    def step(self, step: int, total: int = 100, loss: float = 2.0, at: float | None = None) -> None:
        g = self.gauges
        g["step"].set(step)
        g["total"].set(total)
        g["loss"].set(loss)
        g["tps"].set(1000.0)
        g["eta"].set(max(total - step, 0) * 1.0)
        g["last"].set(time.time() if at is None else at)
        g["checkpoint"].set(step // 10 * 10)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Controllers:
    """The Job controller, the Kubeflow training operator and the kubelet, moved by the test:
    their writes are standin.controllers', their timing is the test's."""

    def __init__(self, api: ApiServer) -> None:
        self.emu = api

    # ----------------------------------------------------------------------------------- runs
    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self.emu.request(
                "POST", path_of("kubetrain.dev/v1alpha1", "trainingruns", NAMESPACE), doc
            )
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.emu.request(
            "PATCH",
            path_of("kubetrain.dev/v1alpha1", "trainingruns", NAMESPACE, name),
            {"spec": spec},
            "application/merge-patch+json",
        )

    def delete_run(self, name: str) -> None:
        self.emu.request(
            "DELETE", path_of("kubetrain.dev/v1alpha1", "trainingruns", NAMESPACE, name)
        )

    def run(self, name: str) -> dict[str, Any]:
        found = [r for r in self.emu.live("trainingruns") if r["metadata"]["name"] == name]
        return found[0] if found else {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in (self.run(name).get("status") or {}).get("conditions", []):
            if c["type"] == type_:
                return dict(c)
        return {}

    def wait_condition(
        self, name: str, type_: str, status: str, reason: str | None = None, timeout: float = 20
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(name, type_)
            ok = c.get("status") == status and (reason is None or c.get("reason") == reason)
            return c if ok else None

        return dict(
            wait_for(
                check,
                timeout,
                what=f"{name} {type_}={status} {reason or ''} (now {self.condition(name, type_)})",
            )
        )

    # ------------------------------------------------------------------------------- children
    def children(self, run: str) -> list[dict[str, Any]]:
        found = self.emu.live("jobs") + self.emu.live("pytorchjobs")
        return [c for c in found if c["metadata"].get("labels", {}).get("kubetrain.dev/run") == run]

    def wait_child(self, run: str, suffix: str, timeout: float = 20) -> dict[str, Any]:
        name = f"{run}-{suffix}"

        def find() -> dict[str, Any] | None:
            for c in self.children(run):
                if c["metadata"]["name"] == name or (
                    suffix == "preprocess"
                    and c["metadata"]["name"].startswith(f"{run}-preprocess-")
                ):
                    return c
            return None

        return dict(wait_for(find, timeout, what=f"child {name}"))

    def pods(self, child: dict[str, Any]) -> list[dict[str, Any]]:
        name = child["metadata"]["name"]
        return [
            p
            for p in self.emu.live("pods")
            if name
            in (
                p["metadata"]["labels"].get("batch.kubernetes.io/job-name"),
                p["metadata"]["labels"].get("training.kubeflow.org/job-name"),
            )
        ]

    def _child_status(self, child: dict[str, Any], state: str) -> None:
        plural = "jobs" if child["kind"] == "Job" else "pytorchjobs"
        self.emu.request(
            "PATCH",
            path_of(child["apiVersion"], plural, NAMESPACE, child["metadata"]["name"]) + "/status",
            {"status": job_status(child["kind"], state, time.time(), **_named(child))},
            "application/merge-patch+json",
        )

    def _pod_status(self, pod: dict[str, Any]) -> None:
        self.emu.request(
            "PATCH",
            path_of("v1", "pods", NAMESPACE, pod["metadata"]["name"]) + "/status",
            {"status": pod["status"]},
            "application/merge-patch+json",
        )

    def start(self, child: dict[str, Any]) -> None:
        """Pods are created and run; the controller reports Running."""
        replicas = [("master", 0)]
        if child["kind"] == "PyTorchJob":
            workers = child["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
            replicas += [("worker", i) for i in range(workers)]
        for replica, index in replicas:
            pod = pod_for(child, replica=replica, index=index, at=time.time())
            body = {k: v for k, v in pod.items() if k != "status"}
            self.emu.request("POST", path_of("v1", "pods", NAMESPACE), body)
            self._pod_status(pod)
        self._child_status(child, "running")

    def finish(self, child: dict[str, Any], code: int = 0, message: str | None = None) -> None:
        """Every pod terminates (the master with `code` and `message`); the controller reports
        Complete/Succeeded or Failed."""
        for pod in self.pods(child):
            master = (
                pod["metadata"]["labels"].get("training.kubeflow.org/replica-type", "master")
                == "master"
            )
            done = pod_for(
                child,
                exit_code=code if master else (0 if code == 0 else 143),
                message=message if master else None,
                at=time.time(),
                replica=pod["metadata"]["labels"].get(
                    "training.kubeflow.org/replica-type", "master"
                ),
            )
            pod["status"] = done["status"]
            self._pod_status(pod)
        self._child_status(child, "succeeded" if code == 0 else "failed")

    def _stop_pod(self, pod: dict[str, Any]) -> None:
        """The kubelet's part: SIGTERM → the trainer checkpoints and exits 143; the pod goes."""
        name = pod["metadata"]["name"]
        if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            container = pod["spec"]["containers"][0]["name"]
            pod["status"] = pod_status(container, "Failed", 143, None, time.time())
            with contextlib.suppress(ApiFailure):
                self._pod_status(pod)
        with contextlib.suppress(ApiFailure):
            self.emu.request(
                "DELETE", path_of("v1", "pods", NAMESPACE, name), {"gracePeriodSeconds": 0}
            )

    def suspend(self, child: dict[str, Any]) -> None:
        """What the controllers do on suspend: pods stop (exit 143 after a checkpoint) and go
        away; the child says Suspended."""
        for pod in self.pods(child):
            self._stop_pod(pod)
        self._child_status(child, "suspended")

    def kubelet(self) -> int:
        """Finish every graceful pod deletion (the garbage collector deletes a deleted child's
        pods gracefully; the kubelet stops them). Returns how many pods it stopped."""
        stopping = [p for p in self.emu.live("pods") if p["metadata"].get("deletionTimestamp")]
        for pod in stopping:
            self._stop_pod(pod)
        return len(stopping)


def _named(child: dict[str, Any]) -> dict[str, str]:
    """The name and namespace a controller's condition messages quote."""
    return {"name": child["metadata"]["name"], "namespace": child["metadata"]["namespace"]}
