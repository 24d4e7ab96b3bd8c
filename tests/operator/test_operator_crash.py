"""Crash safety: the operator is killed (SIGKILL) at every point of a lifecycle and restarted.

Real: the operator process and the Kopf reactor, the stand-in API server over HTTP, a trainer
metrics endpoint (prometheus-client). Played by the test: the Job controller, the Kubeflow
training operator and the kubelet (tests/support/operator_harness.py).

The lifecycle has eleven controller steps (preprocess, a retryable failure, a stall, success,
merge). Around each step the operator is killed twice: once before the step (the step happens
while no operator runs, so its events are missed), once 0.15 s after it (in the middle of the
reaction). Every kill is followed by a restart. Throughout, the test records every child it sees
by name and uid: a name seen with two uids is a duplicate child, two attempts with running pods
at once are two trainers. The run must converge to Succeeded with exactly train-1..3.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from operator_harness import ApiServer, Controllers, OperatorProcess, TrainerMetrics, wait_for
from operator_support import PREPROCESS_RESULT, result, run_doc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN = "crashy"


class Observer(threading.Thread):
    """Watches the children from outside: duplicates and concurrent trainers."""

    def __init__(self, c: Controllers) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.uids: dict[str, set[str]] = {}
        self.concurrent: list[tuple[str, ...]] = []
        self.first_seen: dict[str, float] = {}
        self.last_active: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            children = self.c.children(RUN)
            now = time.monotonic()
            for child in children:
                self.uids.setdefault(child["metadata"]["name"], set()).add(child["metadata"]["uid"])
                self.first_seen.setdefault(child["metadata"]["name"], now)
            pods = self.c.emu.live("pods")
            running = {
                p["metadata"]["labels"].get("training.kubeflow.org/job-name")
                for p in pods
                if p["metadata"]["labels"].get("kubetrain.dev/stage") == "train"
                and (p.get("status") or {}).get("phase") in ("Pending", "Running")
            } - {None}
            for name in running:
                self.last_active[str(name)] = now
            if len(running) > 1:
                self.concurrent.append(tuple(sorted(str(r) for r in running)))
            time.sleep(0.02)


def test_kill_and_restart_at_every_point_never_duplicates_and_converges(tmp_path: Path) -> None:
    with ApiServer(tmp_path) as api:
        op = OperatorProcess(api, tmp_path)
        c = Controllers(api)
        served = TrainerMetrics(RUN)
        op.map_metrics(RUN, served.url)
        healthy = threading.Event()

        def heartbeat() -> None:
            step = 0
            while not stop_beat.is_set():
                if healthy.is_set():
                    step += 1
                    served.step(step % 100)
                time.sleep(0.3)

        stop_beat = threading.Event()
        threading.Thread(target=heartbeat, daemon=True).start()
        observer = Observer(c)
        observer.start()
        state: dict[str, Any] = {}

        def child(suffix: str) -> dict[str, Any]:
            return c.wait_child(RUN, suffix, timeout=30)

        def status() -> dict[str, Any]:
            return dict(c.run(RUN).get("status") or {})

        steps: list[tuple[str, Callable[[], None], Callable[[], Any]]] = [
            (
                "apply",
                lambda: state.update(run=c.apply(run_doc(RUN, maxRestarts=3, stallTimeout="4s"))),
                lambda: c.children(RUN),
            ),
            (
                "preprocess runs",
                lambda: c.start(child("preprocess")),
                lambda: "running" in c.condition(RUN, "Ready").get("message", ""),
            ),
            (
                "preprocess done",
                lambda: c.finish(child("preprocess"), 0, result("preprocess", **PREPROCESS_RESULT)),
                lambda: [x for x in c.children(RUN) if x["metadata"]["name"].endswith("-train-1")],
            ),
            (
                "train-1 runs",
                lambda: (healthy.set(), c.start(child("train-1"))),
                lambda: (status().get("progress") or {}).get("step"),
            ),
            (
                "train-1 fails",
                lambda: c.finish(child("train-1"), 1, result("train", False, error="NCCL timeout")),
                lambda: [x for x in c.children(RUN) if x["metadata"]["name"].endswith("-train-2")],
            ),
            (
                "train-2 runs, no steps",
                lambda: (healthy.clear(), c.start(child("train-2"))),
                lambda: (
                    not [x for x in c.children(RUN) if x["metadata"]["name"].endswith("-train-2")]
                ),
            ),
            (
                "kubelet stops train-2",
                lambda: wait_for(c.kubelet, 30, what="train-2 pods"),
                lambda: [x for x in c.children(RUN) if x["metadata"]["name"].endswith("-train-3")],
            ),
            (
                "train-3 runs",
                lambda: (healthy.set(), c.start(child("train-3"))),
                lambda: c.condition(RUN, "Ready").get("reason") == "Training",
            ),
            (
                "train-3 done",
                lambda: c.finish(
                    child("train-3"),
                    0,
                    result(
                        "train",
                        step=100,
                        totalSteps=100,
                        outputs={"final": f"s3://out/{RUN}/final"},
                    ),
                ),
                lambda: [x for x in c.children(RUN) if x["metadata"]["name"].endswith("-merge")],
            ),
            (
                "merge runs",
                lambda: c.start(child("merge")),
                lambda: "running" in c.condition(RUN, "Ready").get("message", ""),
            ),
            (
                "merge done",
                lambda: c.finish(
                    child("merge"), 0, result("merge", outputs={"merged": f"s3://out/{RUN}/merged"})
                ),
                lambda: c.condition(RUN, "Succeeded").get("status") == "True",
            ),
        ]
        kills = 0
        op.start()
        try:
            for name, act, reacted in steps:
                # point 1: the step happens while the operator is down
                op.kill()
                kills += 1
                act()
                op.start()
                wait_for(reacted, 40, what=f"reaction to {name!r} after a restart")
                # point 2: killed in the middle of the reaction to a repeat of the state
                op.kill()
                kills += 1
                op.start()
                time.sleep(0.15 if kills % 4 else 1.0)
                wait_for(reacted, 40, what=f"{name!r} still holds after a restart")
            healthy.clear()
            final = status()
            time.sleep(2)  # nothing more happens once converged
        finally:
            observer.stop.set()
            observer.join(5)
            stop_beat.set()
            op.stop()
            served.close()
        duplicates = {n: u for n, u in observer.uids.items() if len(u) > 1}
        assert duplicates == {}
        assert observer.concurrent == []
        names = sorted(observer.uids)
        trains = [n for n in names if "-train-" in n]
        assert trains == [f"{RUN}-train-1", f"{RUN}-train-2", f"{RUN}-train-3"]
        for old, new in itertools.pairwise(trains):  # never two trainers
            assert observer.first_seen[new] > observer.last_active[old], (old, new)
        assert final["phase"] == "Succeeded" and final["attempts"] == 3
        assert [a["reason"] for a in final["attemptHistory"]] == ["initial", "failure", "stall"]
        assert kills >= 20
        print(f"crash points: {kills}, operator starts: {op.starts}")
