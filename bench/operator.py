"""The operator under load: N TrainingRuns applied at once to the stand-in API server.

    .venv/bin/python bench/operator.py --runs 500

Starts standin's API server (a process of its own, as a cluster's API server is) and the
real operator (`python -m kopf run --standalone -m kubetrain_operator.main --namespace ml`,
production timings: resync and progress polling every 30 s), then:

1. applies every run as fast as 8 client threads can POST them, and times until every run has its
   first child (the preprocess Job);
2. waits until the operator is idle (no request for 3 s) and counts its requests per run;
3. plays the Job controller: marks every preprocess Job Complete at once (8 threads) and times,
   per run, from its Job's status change to the run's `DataReady=True` as a watch over HTTP
   delivers it (a burst);
4. plays the training operator: marks each run's train-1 PyTorchJob Running, paced (--rate per
   second), and times the same way until the run's Ready reason is Training;
5. applies a second wave of N runs while playing the Job controller in a closed loop: each
   preprocess Job is marked Complete as soon as a watch shows it, so status changes arrive while
   the operator is still creating the other runs' children; times as in 3. A stress case beyond
   the figures the targets are for (3 and 4): on two cores the operator and the API server are
   both CPU-bound here, and the latency is their queue;
6. reads the operator's peak RSS (VmHWM).

Prints one table with the targets next to the figures. Requests are those with the operator's
user agents (Kopf's and the kubernetes client's), watches included. The stand-in gets our CRD
with an open schema here: its schema and CEL interpreters cost ~80 ms per TrainingRun write in
cel-python, which would be the figure measured instead of the operator (the tests admit with the
full CRD).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]  # the stand-in, test helpers

from kubetrain_operator.render import LABEL_RUN, LABEL_STAGE  # noqa: E402
from operator_harness import (  # noqa: E402
    TEST_AGENT,
    ApiServerProcess,
    OperatorProcess,
    crd_without_admission,
    path_of,
    wait_for,
)
from operator_support import NAMESPACE, run_doc  # noqa: E402
from standin.controllers import job_status  # noqa: E402


def operator_calls(api: ApiServerProcess) -> int:
    return sum(1 for c in api.calls() if c.user_agent != TEST_AGENT)


def breakdown(api: ApiServerProcess, start: int, runs: int) -> str:
    """Operator requests per run since call number `start`, by verb and resource."""
    counts = Counter(
        f"{c.verb} {c.resource}" for c in api.calls()[start:] if c.user_agent != TEST_AGENT
    )
    return ", ".join(f"{k} {v / runs:.2f}" for k, v in counts.most_common())


def idle(api: ApiServerProcess, quiet: float = 3.0, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    last, since = operator_calls(api), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = operator_calls(api)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise RuntimeError("the operator never went idle")


class Watch(threading.Thread):
    """A watch over HTTP (as any client sees the API): when each object first satisfies `test`.
    Cheaper for the server than polling 500 objects."""

    def __init__(
        self, api: ApiServerProcess, path: str, test: Callable[[dict[str, Any]], str | None]
    ):
        super().__init__(daemon=True)
        version = api.request("GET", path)["metadata"]["resourceVersion"]
        self.url = f"{api.url}{path}?watch=true&resourceVersion={version}&timeoutSeconds=900"
        self.test = test
        self.seen: dict[str, float] = {}
        self.response: Any = None

    def run(self) -> None:
        request = urllib.request.Request(self.url, headers={"User-Agent": TEST_AGENT})
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(request, timeout=900) as self.response,
        ):
            for line in self.response:
                name = self.test(json.loads(line)["object"])
                if name is not None and name not in self.seen:
                    self.seen[name] = time.monotonic()

    def close(self) -> None:
        """End the stream (the server cannot shut down while a watch is open)."""
        if self.response is not None:
            with contextlib.suppress(OSError):
                self.response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        self.join(5)

    def wait(self, count: int, timeout: float) -> None:
        wait_for(lambda: len(self.seen) >= count, timeout, what=f"{count} objects")


def set_status(
    api: ApiServerProcess, api_version: str, plural: str, name: str, state: str
) -> float:
    """What a child's controller does: PATCH its status; returns when the server committed it."""
    kind = "Job" if plural == "jobs" else "PyTorchJob"
    api.request(
        "PATCH",
        path_of(api_version, plural, NAMESPACE, name) + "/status",
        {"status": job_status(kind, state, time.time())},
        "application/merge-patch+json",
    )
    return time.monotonic()


def run_of(obj: dict[str, Any]) -> str | None:
    """The run a child belongs to (its kubetrain.dev/run label)."""
    return (obj["metadata"].get("labels") or {}).get(LABEL_RUN)


def data_ready(run: dict[str, Any]) -> str | None:
    for cond in (run.get("status") or {}).get("conditions", []):
        if cond["type"] == "DataReady" and cond["status"] == "True":
            return str(run["metadata"]["name"])
    return None


def closed_loop(
    api: ApiServerProcess, names: list[str], runs_path: str
) -> tuple[float, list[float]]:
    """Apply `names` at once while a Job controller (8 threads) marks each preprocess Job
    Complete as soon as a watch shows it, as the real one does once its pod exits: child status
    changes arrive while the operator is still creating the other runs' children. Returns the
    seconds until every run has its first child, and per run the seconds from its Job's status
    change to the run's DataReady=True."""
    wanted = set(names)
    changed: dict[str, float] = {}
    controller = ThreadPoolExecutor(8)

    def complete(run: str, job: str) -> None:
        changed[run] = set_status(api, "batch/v1", "jobs", job, "succeeded")

    def created(job: dict[str, Any]) -> str | None:
        run = run_of(job)
        if run not in wanted or job["metadata"]["labels"].get(LABEL_STAGE) != "preprocess":
            return None
        if run not in jobs_watch.seen:
            controller.submit(complete, run, job["metadata"]["name"])
        return run

    runs_watch = Watch(api, runs_path, data_ready)
    jobs_watch = Watch(api, path_of("batch/v1", "jobs", NAMESPACE), created)
    runs_watch.start()
    jobs_watch.start()
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: api.request("POST", runs_path, run_doc(n)), names))
    jobs_watch.wait(len(names), 600)
    runs_watch.wait(len(names), 600)
    controller.shutdown()
    jobs_watch.close()
    runs_watch.close()
    idle(api)
    return max(jobs_watch.seen.values()) - started, [runs_watch.seen[n] - changed[n] for n in names]


def measure(
    api: ApiServerProcess,
    names: list[str],
    runs_path: str,
    api_version: str,
    plural: str,
    child: Callable[[str], str],
    state: str,
    reached: Callable[[dict[str, Any]], str | None],
    interval: float,
) -> tuple[list[float], float]:
    """Seconds from each child's status change (when the API server answered its controller's
    PATCH) to the run's status showing it (as a watch delivers it); all at once (8 threads) or
    one every `interval` s. Also: seconds from the first change to the last."""
    watch = Watch(api, runs_path, reached)
    watch.start()
    changed: dict[str, float] = {}

    def change(name: str) -> None:
        changed[name] = set_status(api, api_version, plural, child(name), state)

    if interval:
        for name in names:
            change(name)
            time.sleep(interval)
    else:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(change, names))
    watch.wait(len(names), 600)
    watch.close()
    idle(api)
    return [watch.seen[n] - changed[n] for n in names], max(changed.values()) - min(
        changed.values()
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--rate", type=float, default=25.0, help="paced changes per second")
    args = parser.parse_args()
    names = [f"bench-{i:04d}" for i in range(args.runs)]
    with (
        tempfile.TemporaryDirectory() as tmp,
        ApiServerProcess(Path(tmp), crd_without_admission()) as api,
    ):
        op = OperatorProcess(
            api,
            Path(tmp),
            verbose=False,
            KUBETRAIN_RESYNC_SECONDS="30",
            KUBETRAIN_PROGRESS_SECONDS="30",
            KUBETRAIN_WATCH_SERVER_TIMEOUT="300",
        ).start()
        assert op.proc is not None
        wait_for(
            lambda: any(c.resource == "trainingruns" and c.verb == "list" for c in api.calls()),
            60,
            what="the operator listing runs",
        )
        idle(api, quiet=1.0)
        before = operator_calls(api)
        mark = len(api.calls())
        runs_path = path_of("kubetrain.dev/v1alpha1", "trainingruns", NAMESPACE)
        wanted = set(names)

        def first_child(job: dict[str, Any]) -> str | None:
            run = run_of(job)
            return run if run in wanted else None

        jobs_watch = Watch(api, path_of("batch/v1", "jobs", NAMESPACE), first_child)
        jobs_watch.start()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: api.request("POST", runs_path, run_doc(n)), names))
        applied = time.monotonic() - started
        jobs_watch.wait(len(names), 600)
        jobs_watch.close()
        first_child_s = max(jobs_watch.seen.values()) - started
        idle(api)
        initial_requests = operator_calls(api) - before
        initial_breakdown = breakdown(api, mark, args.runs)
        mark = len(api.calls())

        # the Job controller reports every preprocess Job Complete, all at once
        jobs = {run_of(j): j for j in api.live("jobs")}

        before = operator_calls(api)
        cpu_before, wall_before = cpu_seconds(op.proc.pid), time.monotonic()
        server_before = cpu_seconds(api.pid)
        burst, burst_span = measure(
            api,
            names,
            runs_path,
            "batch/v1",
            "jobs",
            lambda n: jobs[n]["metadata"]["name"],
            "succeeded",
            data_ready,
            0.0,
        )
        change_requests = operator_calls(api) - before
        burst_cpu = cpu_seconds(op.proc.pid) - cpu_before
        server_cpu = cpu_seconds(api.pid) - server_before
        burst_wall = time.monotonic() - wall_before - 3.0  # less the idle wait
        change_breakdown = breakdown(api, mark, args.runs)

        # the training operator reports each train-1 PyTorchJob Running, paced
        def training(run: dict[str, Any]) -> str | None:
            for cond in (run.get("status") or {}).get("conditions", []):
                if cond["type"] == "Ready" and cond["reason"] == "Training":
                    return str(run["metadata"]["name"])
            return None

        paced_cpu = cpu_seconds(op.proc.pid)
        paced, _ = measure(
            api,
            names,
            runs_path,
            "kubeflow.org/v1",
            "pytorchjobs",
            lambda n: f"{n}-train-1",
            "running",
            training,
            1.0 / args.rate,
        )
        paced_cpu = cpu_seconds(op.proc.pid) - paced_cpu

        # a second wave of runs, the Job controller completing each preprocess Job at once
        wave = [f"wave-{i:04d}" for i in range(args.runs)]
        wave_first_child, loop = closed_loop(api, wave, runs_path)
        rss = peak_rss_mib(op.proc.pid)
        op.stop()

    rows = [
        ("runs applied at once", f"{args.runs} (POSTed in {applied:.1f} s)", ""),
        ("every run has its first child", f"{first_child_s:.1f} s", "< 60 s"),
        (
            "operator API requests per run (apply → first child → idle)",
            f"{initial_requests / args.runs:.2f}",
            "≤ 10",
        ),
        (
            "operator API requests per run (child status change → idle)",
            f"{change_requests / args.runs:.2f}",
            "",
        ),
        (
            f"{args.runs} more applied at once, each Job completed as it appears: first child",
            f"{wave_first_child:.1f} s",
            "< 60 s",
        ),
        ("  Job Complete → run status: p50", f"{statistics.median(loop):.2f} s", ""),
        ("  Job Complete → run status: p99", f"{percentile(loop, 0.99):.2f} s", "(stress)"),
        ("Job Complete, all at once: the changes span", f"{burst_span:.2f} s", ""),
        ("Job Complete → run status, all at once: p50", f"{statistics.median(burst):.2f} s", ""),
        (
            "Job Complete → run status, all at once: p99",
            f"{percentile(burst, 0.99):.2f} s",
            "< 2 s",
        ),
        (
            f"PyTorchJob Running → run status, {args.rate:g}/s: p50",
            f"{statistics.median(paced):.2f} s",
            "",
        ),
        (
            f"PyTorchJob Running → run status, {args.rate:g}/s: p99",
            f"{percentile(paced, 0.99):.2f} s",
            "< 2 s",
        ),
        (
            "operator CPU during the burst (of its wall time)",
            f"{burst_cpu:.1f} s of {burst_wall:.1f} s",
            "",
        ),
        ("API server CPU during the burst", f"{server_cpu:.1f} s", ""),
        (
            "operator CPU per child status change: burst / paced",
            f"{burst_cpu / args.runs * 1e3:.1f} / {paced_cpu / args.runs * 1e3:.1f} ms",
            "",
        ),
        ("operator peak RSS", f"{rss:.0f} MiB", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>26}  target")
    for label, value, target in rows:
        print(f"{label:<{width}}  {value:>26}  {target}")
    print(f"\nper run, apply → idle: {initial_breakdown}")
    print(f"per run, status change → idle: {change_breakdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
