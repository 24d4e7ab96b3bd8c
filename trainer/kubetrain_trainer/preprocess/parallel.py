"""Worker processes: an ordered map that fails loudly, and a worker count from the cgroup limits.

`Pool.map` sends chunk i to worker i mod N and yields results in input order, so the output is
the same for any N. Each worker has its own task and result pipes; the parent waits on the
result pipe *and* every worker's process sentinel, so a worker that dies (the OOM killer's SIGKILL,
a segfault) stops the stage at once with its exit status and the likely cause — never the silent
hang or the "subprocess has abruptly died" of `datasets.map`. Workers are spawned, not forked (the
parent holds threads: the metrics server, the Rust thread pool), and exit when the parent does.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, TypeVar

from kubetrain_trainer.stage import StageFailure

T = TypeVar("T")
R = TypeVar("R")

CGROUP = Path("/sys/fs/cgroup")
#: Memory budgeted per worker (tokenizer, one chunk in and out, Python) and for the parent
#: (reader, packers, writer buffers); measured peaks are well below (docs/preprocessing.md).
WORKER_MEMORY = 768 << 20
PARENT_MEMORY = 512 << 20
#: Chunks queued or in progress per worker: one being encoded, one waiting.
IN_FLIGHT = 2
#: A worker that returns nothing for this long is reported as stuck (chunks take seconds).
STALL_SECONDS = 600.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def cpu_limit(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, v1 `cfs_quota_us`); None if unlimited."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    for group in ("cpu", "cpu,cpuacct"):
        quota_us = _read(root / group / "cpu.cfs_quota_us")
        period_us = _read(root / group / "cpu.cfs_period_us")
        if quota_us is not None and period_us is not None:
            return None if int(quota_us) < 0 else int(quota_us) / int(period_us)
    return None


def memory_limit(root: Path = CGROUP) -> int | None:
    """Bytes allowed by the cgroup (v2 `memory.max`, v1 `limit_in_bytes`); None if unlimited."""
    value = _read(root / "memory.max") or _read(root / "memory" / "memory.limit_in_bytes")
    if value is None or value == "max" or int(value) >= 1 << 60:  # v1 spells "unlimited" 2^63
        return None
    return int(value)


def available_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_limit(root)
    return max(1, min(cpus, math.floor(quota))) if quota else cpus


def default_workers(root: Path = CGROUP) -> int:
    """One worker per allowed CPU, as many as the memory limit can hold."""
    workers = available_cpus(root)
    memory = memory_limit(root)
    if memory is not None:
        workers = min(workers, (memory - PARENT_MEMORY) // WORKER_MEMORY)
    return max(1, workers)


class WorkerDied(RuntimeError):
    """A worker process ended while it had work: the stage fails (exit 1, retried)."""


def _serve(tasks: Connection, results: Connection, threads: int) -> None:
    """A worker: ("use", factory, args) sets the callable, tasks are answered, None ends it.

    It holds only the reading end of its task pipe and the writing end of its result pipe, so
    when the parent dies (even mid-message) the next read or write fails and the worker exits.
    """
    os.environ.update(
        RAYON_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="true" if threads > 1 else "false",
        OMP_NUM_THREADS="1",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    function: Callable[[Any], Any] | None = None
    setup_error: tuple[Any, ...] | None = None
    while True:
        try:
            message = tasks.recv()
        except (EOFError, OSError):  # the parent is gone: do not linger as an orphan
            return
        if message is None:
            return
        if message[0] == "use":
            function, setup_error = None, None
            try:
                function = message[1](*message[2])
            except Exception as error:
                setup_error = _reply_for(error)
            continue
        try:
            assert function is not None or setup_error is not None
            reply = setup_error or ("ok", function(message[1]))  # type: ignore[misc]
        except Exception as error:
            reply = _reply_for(error)
        try:
            results.send(reply)
        except OSError:
            return


def _reply_for(error: Exception) -> tuple[Any, ...]:
    if isinstance(error, StageFailure):
        return ("failure", error.exit_code, error.message, error.details)
    return ("error", "".join(traceback.format_exception(error)))


def _death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        cause = f"was killed by {name}"
        if name == "SIGKILL":
            cause += (
                " — most often the kernel's out-of-memory killer: raise the memory limit of the "
                "preprocess pod or lower the number of workers"
            )
    else:
        cause = f"exited with code {code}"
    return f"preprocess worker {process.name} (pid {process.pid}) {cause}; the stage stops here"


def _feed(connection: Connection, inbox: queue.SimpleQueue[Any]) -> None:
    """Send a worker its (pickled) tasks from a thread: the parent never blocks on a full pipe."""
    while (item := inbox.get()) is not _STOP:
        try:
            connection.send_bytes(item)
        except OSError:  # the worker died; the parent finds out through its sentinel
            break
    connection.close()


_STOP = object()


def _pickle(message: object) -> bytes:
    """Pickled here, not in the feeder thread, so an unpicklable task fails loudly at once."""
    return bytes(ForkingPickler.dumps(message))


class Pool:
    """N worker processes for the whole stage (one start-up, several `map`s); 1 = this process."""

    def __init__(self, workers: int, threads: int = 1) -> None:
        self.workers = workers
        self.processes: list[Any] = []
        self.inboxes: list[queue.SimpleQueue[Any]] = []
        self.feeders: list[threading.Thread] = []
        self.results: list[Connection] = []
        self.broken = False
        if workers <= 1:
            return
        context = mp.get_context("spawn")
        for k in range(workers):
            task_out, task_in = context.Pipe(duplex=False)
            result_out, result_in = context.Pipe(duplex=False)
            process = context.Process(
                target=_serve,
                args=(task_out, result_in, threads),
                name=f"kubetrain-preprocess-{k}",
                daemon=True,
            )
            process.start()
            task_out.close()
            result_in.close()
            inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
            feeder = threading.Thread(target=_feed, args=(task_in, inbox), daemon=True)
            feeder.start()
            self.processes.append(process)
            self.inboxes.append(inbox)
            self.feeders.append(feeder)
            self.results.append(result_out)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(graceful=exc[0] is None and not self.broken)

    def map(
        self, factory: Callable[..., Callable[[T], R]], args: tuple[Any, ...], tasks: Iterable[T]
    ) -> Iterator[R]:
        """`factory(*args)` built once per worker, applied to every task; results in task order."""
        if self.workers <= 1:
            yield from map(factory(*args), tasks)
            return
        if self.broken:
            raise RuntimeError("the worker pool already failed")
        self.broken = True  # until this map completes: results of an abandoned map are pending
        for inbox in self.inboxes:
            inbox.put(_pickle(("use", factory, args)))
        pending: deque[int] = deque()
        source, sent, exhausted = iter(tasks), 0, False
        while True:
            while not exhausted and len(pending) < IN_FLIGHT * self.workers:
                task = next(source, None)
                if task is None:
                    exhausted = True
                    break
                self.inboxes[sent % self.workers].put(_pickle(("task", task)))
                pending.append(sent % self.workers)
                sent += 1
            if not pending:
                break
            yield self._receive(pending.popleft())
        self.broken = False

    def _receive(self, k: int) -> Any:
        """The next result of worker k; raises if any worker dies or k stalls."""
        sentinels = [p.sentinel for p in self.processes]
        deadline = time.monotonic() + STALL_SECONDS
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            ready = wait([self.results[k], *sentinels], timeout=timeout)
            if self.results[k] in ready:
                try:
                    reply = self.results[k].recv()
                except (EOFError, OSError):  # died before or while sending
                    self.processes[k].join(timeout=5)
                    raise WorkerDied(_death(self.processes[k])) from None
                return self._unwrap(k, reply)
            for process in self.processes:
                if process.sentinel in ready:
                    process.join(timeout=5)
                    raise WorkerDied(_death(process))
            if not ready:
                raise WorkerDied(
                    f"preprocess worker {self.processes[k].name} returned nothing for "
                    f"{STALL_SECONDS:.0f} s; the stage stops instead of hanging"
                )

    def _unwrap(self, k: int, reply: tuple[Any, ...]) -> Any:
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "failure":
            raise StageFailure(reply[1], reply[2], reply[3])
        raise RuntimeError(f"preprocess worker {self.processes[k].name} failed:\n{reply[1]}")

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: let them finish (graceful) or kill them (after a failure)."""
        for inbox in self.inboxes:
            if graceful:
                inbox.put(_pickle(None))
            inbox.put(_STOP)
        for process in self.processes:
            if graceful:
                process.join(timeout=10)
            if process.is_alive():
                process.kill()
            process.join()
        for feeder in self.feeders:
            feeder.join(timeout=10)
        self.processes, self.inboxes, self.feeders, self.results = [], [], [], []
