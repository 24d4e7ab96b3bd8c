"""How long a stage process lives, and who may write its output.

* **It dies with its launcher.** `die_with_parent` asks the kernel (`prctl(PR_SET_PDEATHSIG)`)
  to SIGKILL this process when its parent dies — `kubetrain run` killed with SIGKILL, torchrun
  killed by the OOM killer — so no orphaned trainer keeps writing checkpoints into an output
  that a re-run is already using. (Linux only; elsewhere a no-op.)
* **One writer per output.** `OutputLock` holds `fcntl.flock` on `<output>/.kubetrain.lock` for
  the life of the stage; the kernel releases it on any exit, SIGKILL included, so a stale lock
  never needs cleaning. A second stage on the same output fails at once (exit 1: the other one
  may end, then a retry succeeds), naming the holder the lock file records. S3 outputs have no
  locks: there the operator's one-attempt-at-a-time rule is the guard.
* **A termination signal stops at a step boundary.** `stop_on_signals` routes SIGTERM and SIGINT
  (pod deletion, Ctrl-C) to a flag and nothing else — a handler may interrupt anything; the train
  stage's `checkpoint.SignalStop` acts on it after the step (every rank at the same one), saves a
  checkpoint and stops, and the stage exits 143. (That callback is a `TrainerCallback`: it stays
  with the checkpoints so that this module, imported by every stage, never imports transformers.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import IO, Any, Protocol

from kubetrain_trainer import storage
from kubetrain_trainer.stage import Retryable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LOCK_FILE = ".kubetrain.lock"


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies; if the parent already
    died before the request took effect (reparented), exit now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    if os.getppid() != parent:
        os._exit(1)


class OutputLock:
    """An exclusive, non-blocking lock on a local output directory, held until release."""

    def __init__(self, output_uri: str, stage: str) -> None:
        self.output_uri, self.stage = output_uri, stage
        self._handle: IO[str] | None = None

    def acquire(self) -> OutputLock:
        if storage.is_s3(self.output_uri) or storage.is_hf(self.output_uri):
            return self
        directory = storage.local_path(self.output_uri)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise Retryable(
                f"{self.output_uri}: another kubetrain stage is writing this output ({holder}) — "
                "two trainers on one output would overwrite each other's checkpoints; wait for "
                "it to end or stop it, or give this run another output",
                {"reason": "OutputLocked", "lockFile": str(path)},
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "stage": self.stage,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
    except ValueError:
        return "holder unknown"
    return (
        f"{holder.get('stage', '?')} stage, pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')}"
    )


class StopFlag(Protocol):
    """Where a termination signal leaves its request (`callbacks.StepAccounting`)."""

    stop_requested: bool


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """SIGTERM and SIGINT set `flag.stop_requested` inside the block; the previous handlers are
    restored when it ends, however it ends."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        flag.stop_requested = True  # nothing else: a handler may interrupt anything

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
