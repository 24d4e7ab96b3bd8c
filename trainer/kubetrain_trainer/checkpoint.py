"""Checkpoints that count only when complete, uploaded in the background, resumed automatically.

HF Trainer writes `checkpoint-N/` (model, optimizer and scheduler, per-rank RNG, DeepSpeed shards).
Then every rank meets at a barrier, and the finalizer fsyncs every file and directory, writes
`COMPLETE` — the step, the data position, what the run was (dataset, method, global batch,
processes, attempt) and every file with its size and sha256 — and renames the directory to
`step-NNNNNNNN/`. A process killed at any point leaves either a `checkpoint-N/` (discarded at the
next start) or a complete `step-N/`. Resume takes the newest `step-N/` whose files are all there
*and* match their checksums — a same-size corruption (a bad disk, a torn copy) is caught, warned
about, and the previous complete checkpoint is used instead — then refuses (exit 2) a checkpoint
of another dataset, method or global batch, or one sharded by ZeRO for another process count.

With an S3 output the checkpoints are staged in the workdir and a background thread uploads them:
each node's files, then `NODE-<i>.json` naming them with the attempt (`KUBETRAIN_ATTEMPT`), and
last — after every node's marker *of this attempt* is there — `COMPLETE`: a marker a node of an
earlier attempt left under the same step never completes a checkpoint. A remote prefix without
`COMPLETE` is never resumed from. Uploads are retried with backoff; every failed attempt is
counted in `kubetrain_checkpoint_upload_failures_total`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kubetrain_contract.layout import (
    ATTEMPT_ENV,
    CHECKPOINT_STEP_PREFIX,
    CHECKPOINTS_DIR,
    checkpoint_name,
)
from kubetrain_trainer import storage
from kubetrain_trainer.callbacks import StepAccounting
from kubetrain_trainer.config import S3Settings, TrainConfig
from kubetrain_trainer.data import StreamPosition
from kubetrain_trainer.distributed import DistEnv
from kubetrain_trainer.metrics import TrainerMetrics
from kubetrain_trainer.stage import InvalidInput

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
NODE_MARKER = "NODE-{node}.json"
#: Seconds between upload attempts; an upload is abandoned after the last (the next one retries).
RETRY_DELAYS = (2.0, 4.0, 8.0, 16.0, 32.0)
#: Niceness of the upload threads (Linux schedules threads individually).
UPLOAD_NICENESS = 10
#: How long node 0 waits for the other nodes' uploads before giving up on a checkpoint.
NODE_WAIT_SECONDS = 1800.0
#: The training attempt (set by the operator on training pods; 0 when run by hand).


def attempt() -> int:
    return int(os.environ.get(ATTEMPT_ENV, "0") or 0)


def is_bookkeeping(directory: Path, path: Path) -> bool:
    """The markers, and download_dir's record of what it fetched, at the top of a checkpoint:
    not part of it."""
    name = path.name
    top = path.parent == directory
    return top and (name in (MARKER, storage.DOWNLOAD_STATE) or name.startswith("NODE-"))


def files_of(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path → {bytes, sha256} of every file below directory, markers excluded; each
    file is fsynced on the way (its contents are durable before a marker names it)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not is_bookkeeping(directory, path):
            storage.fsync(path)
            found[path.relative_to(directory).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": storage.sha256_file(path),
            }
    return found


def fsync_tree(directory: Path) -> None:
    """Make every directory entry below `directory` (and its own) durable."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir():
            storage.fsync(path)
    storage.fsync(directory)


def _listed(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Every file the markers name: COMPLETE's own, and those of the NODE markers of its
    attempt (a stale NODE marker of another attempt names nothing)."""
    listed = dict(meta.get("files", {}))
    for node_marker in sorted(directory.glob("NODE-*.json")):
        node = json.loads(node_marker.read_text(encoding="utf-8"))
        if node.get("attempt", meta.get("attempt")) == meta.get("attempt"):
            listed.update(node.get("files", {}))
    return listed


def _expected(entry: Any) -> tuple[int, str | None]:
    """(bytes, sha256) of a marker entry; markers older than checksums list the size only."""
    if isinstance(entry, dict):
        return int(entry["bytes"]), entry.get("sha256")
    return int(entry), None


def _unlisted(directory: Path, listed: dict[str, Any]) -> list[str]:
    """Files below directory that no marker names: nothing vouches for them, and DeepSpeed
    globs its shards (`*_optim_states.pt`), so a planted one would be unpickled."""
    return [
        rel
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not is_bookkeeping(directory, path)
        if (rel := path.relative_to(directory).as_posix()) not in listed
    ]


def read_marker(directory: Path, *, verify: bool = False) -> dict[str, Any] | None:
    """The COMPLETE metadata if the checkpoint is whole: every listed file present at its size
    and, with `verify`, matching its sha256 and no file there that the markers do not list (a
    mismatch or a stray file is logged as a warning). `verify` runs before anything of the
    checkpoint is unpickled: DeepSpeed loads its files with `weights_only=False`."""
    try:
        meta: dict[str, Any] = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        listed = _listed(directory, meta)
    except (OSError, ValueError):
        return None
    stray = _unlisted(directory, listed) if verify else []
    if stray:
        log.warning(
            "checkpoint %s: %s is not listed in %s (not written by the trainer); not resumable",
            directory,
            stray[0],
            MARKER,
        )
        return None
    for rel, entry in listed.items():
        try:
            path = storage.contained(directory, rel, f"{directory / MARKER}")
        except storage.Refused as error:
            log.warning("checkpoint %s: %s; not resumable", directory, error.message)
            return None
        size, digest = _expected(entry)
        if not path.is_file() or path.stat().st_size != size:
            log.warning("checkpoint %s: %s is missing or truncated; not resumable", directory, rel)
            return None
        if verify and digest is not None and storage.sha256_file(path) != digest:
            log.warning(
                "checkpoint %s: %s does not match its sha256 in %s (corrupted on disk or in "
                "transfer); not resumable",
                directory,
                rel,
                MARKER,
            )
            return None
    return meta


def write_marker(directory: Path, meta: dict[str, Any]) -> None:
    """COMPLETE, written (atomically, fsynced) after everything it names is durable."""
    fsync_tree(directory)
    storage.write_text(str(directory / MARKER), json.dumps(meta, sort_keys=True))
    storage.fsync(directory)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    location: str
    """Local directory or remote URI."""


def _step_of(name: str) -> int | None:
    digits = name[len(CHECKPOINT_STEP_PREFIX) :]
    return int(digits) if name.startswith(CHECKPOINT_STEP_PREFIX) and digits.isdigit() else None


def local_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints in a local directory, oldest first."""
    found = []
    for path in root.glob(f"{CHECKPOINT_STEP_PREFIX}*"):
        step = _step_of(path.name)
        if step is not None and read_marker(path) is not None:
            found.append(Checkpoint(step, str(path)))
    return sorted(found, key=lambda c: c.step)


def remote_checkpoints(uri: str, s3: S3Settings) -> list[Checkpoint]:
    """Checkpoints under an S3 prefix whose COMPLETE object exists, oldest first."""
    found = set()
    try:
        for rel, _, _ in storage.list_objects(uri, s3):
            name, _, rest = rel.partition("/")
            step = _step_of(name)
            if rest == MARKER and step is not None:
                found.add(Checkpoint(step, storage.join(uri, name)))
    except storage.NotFound:
        return []
    return sorted(found, key=lambda c: c.step)


def recover(root: Path) -> None:
    """Tidy a staging directory after a crash: finish renames a kill interrupted, drop the rest."""
    for path in sorted(root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        step = path.name.rpartition("-")[2]
        if step.isdigit() and read_marker(path, verify=True) is not None:
            target = root / checkpoint_name(int(step))
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            log.info("checkpoint %s: completed an interrupted rename", target.name)
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.info("checkpoint %s: incomplete, removed", path.name)


def delete_remote(uri: str, s3: S3Settings) -> None:
    """Delete every object under an S3 prefix (S3 has no directories to remove)."""
    bucket, prefix = storage.split_s3(uri)
    keys = [f"{prefix.rstrip('/')}/{rel}" for rel, _, _ in storage.list_objects(uri, s3)]
    # COMPLETE first: a half-deleted checkpoint must never look resumable.
    keys.sort(key=lambda key: not key.endswith(f"/{MARKER}"))
    for start in range(0, len(keys), 1000):
        objects = [{"Key": key} for key in keys[start : start + 1000]]
        storage.client(s3).delete_objects(Bucket=bucket, Delete={"Objects": objects})


class UploadFailed(RuntimeError):
    """Every attempt to copy something to the output store failed."""


def with_retries(upload: Callable[[], None], *, what: str, metrics: TrainerMetrics | None) -> None:
    """Run an upload, retrying with backoff; each failed attempt is logged and counted."""
    for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
        time.sleep(delay)
        try:
            upload()
            return
        except (storage.StorageError, OSError, TimeoutError) as error:
            if metrics is not None:
                metrics.checkpoint_upload_failures.labels(run=metrics.run).inc()
            log.warning("%s: upload attempt %d failed: %s", what, attempt + 1, error)
    raise UploadFailed(f"{what}: upload failed {1 + len(RETRY_DELAYS)} times; see the log")


@dataclass(frozen=True)
class ModelDir:
    """A model directory of the run's output (`final/`, `merged/`), published only when whole.

    The model is written into `building`, beside `target`: the output itself when it is local, a
    copy of the same name in the workdir when it is remote. :meth:`publish` writes `COMPLETE`
    last, renames the directory into place and, for a remote output, uploads it.
    """

    uri: str
    target: Path
    building: Path

    @classmethod
    def of(cls, output_uri: str, name: str, workdir: Path) -> ModelDir:
        uri = storage.join(output_uri, name)
        target = workdir / name if storage.is_s3(uri) else storage.local_path(uri)
        return cls(uri, target, target.with_name(f".{target.name}.tmp"))

    def publish(
        self,
        meta: dict[str, Any],
        *,
        s3: S3Settings,
        what: str,
        metrics: TrainerMetrics | None,
    ) -> None:
        write_marker(self.building, {**meta, "files": files_of(self.building)})
        shutil.rmtree(self.target, ignore_errors=True)
        self.building.rename(self.target)
        if storage.is_s3(self.uri):
            with_retries(
                lambda: storage.upload_dir(self.target, self.uri, s3, marker=MARKER),
                what=what,
                metrics=metrics,
            )


class Uploader:
    """One background thread per node that copies finished checkpoints to the output store.

    Only the newest pending checkpoint waits in line: an older one not yet started is dropped,
    because the newer one supersedes it. Training never waits, except in :meth:`drain` at the end.
    """

    def __init__(
        self,
        *,
        remote_root: str,
        s3: S3Settings,
        node: int,
        nodes: int,
        keep: int,
        metrics: TrainerMetrics | None,
        on_complete: Callable[[int, float], None],
    ) -> None:
        self.remote_root, self.s3, self.node, self.nodes = remote_root, s3, node, nodes
        self.keep, self.metrics, self.on_complete = keep, metrics, on_complete
        self.attempt, self.node_wait = attempt(), NODE_WAIT_SECONDS
        self._pending: tuple[Path, float] | None = None
        self._active: Path | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, directory: Path, write_seconds: float) -> None:
        with self._wake:
            if self._pending is not None:
                log.info("checkpoint %s: superseded before upload", self._pending[0].name)
            self._pending = (directory, write_seconds)
            self._wake.notify_all()

    def busy(self) -> set[Path]:
        """Directories the thread still needs: local rotation must keep them."""
        with self._wake:
            return {p for p in (self._active, self._pending and self._pending[0]) if p is not None}

    def drain(self) -> None:
        """Wait until everything submitted is uploaded (or given up), then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join()

    def _run(self) -> None:
        # Lower this thread's CPU priority (and that of the transfer threads it starts, which
        # inherit it): on a busy host the training loop wins, the upload waits. Linux only: there
        # a thread id is a schedulable task; elsewhere it would name some other process.
        if sys.platform == "linux":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._pending is None:
                    return
                (self._active, write_seconds), self._pending = self._pending, None
            started, directory = time.monotonic(), self._active
            try:
                with_retries(
                    functools.partial(self._upload, directory),
                    what=f"checkpoint {directory.name}",
                    metrics=self.metrics,
                )
                self.on_complete(
                    _step_of(directory.name) or 0, write_seconds + time.monotonic() - started
                )
            except UploadFailed as error:
                log.error("%s — the next checkpoint will try again", error)
            with self._wake:
                self._active = None

    def _upload(self, directory: Path) -> None:
        remote = storage.join(self.remote_root, directory.name)
        files = files_of(directory)
        for rel in files:
            storage.upload_file(directory / rel, storage.join(remote, rel), self.s3)
        node_marker = NODE_MARKER.format(node=self.node)
        storage.write_text(
            storage.join(remote, node_marker),
            json.dumps({"files": files, "attempt": self.attempt}),
            self.s3,
        )
        if self.node != 0:
            return
        deadline = time.monotonic() + self.node_wait
        for other in range(1, self.nodes):
            marker = storage.join(remote, NODE_MARKER.format(node=other))
            while not self._uploaded(marker):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{marker}: node {other} did not finish its upload of attempt "
                        f"{self.attempt}"
                    )
                time.sleep(min(2.0, self.node_wait / 4))
        storage.upload_file(directory / MARKER, storage.join(remote, MARKER), self.s3)
        log.info("checkpoint %s: uploaded to %s", directory.name, remote)
        self._rotate()

    def _uploaded(self, marker: str) -> bool:
        """A node's marker of this attempt is there (one of an earlier attempt does not count)."""
        try:
            node = json.loads(storage.read_text(marker, self.s3))
        except (storage.NotFound, ValueError):
            return False
        return bool(node.get("attempt") == self.attempt)

    def _rotate(self) -> None:
        for old in remote_checkpoints(self.remote_root, self.s3)[: -self.keep]:
            delete_remote(old.location, self.s3)
            log.info("checkpoint %s: rotated out", old.location)


@dataclass(frozen=True)
class CheckpointLayout:
    """Where checkpoints are written: the output's checkpoints/ (local outputs), or a staging
    directory in the workdir uploaded to the output's checkpoints/ (S3 outputs)."""

    staging: Path
    remote_root: str | None
    finalizer: bool
    """This process completes checkpoints: global rank 0 locally, each node's first on S3."""

    @classmethod
    def of(cls, config: TrainConfig, workdir: Path, env: DistEnv) -> CheckpointLayout:
        if storage.is_s3(config.output_uri):
            return cls(
                workdir / f"{config.stage}-checkpoints",  # sanity and train may share a workdir
                storage.join(config.output_uri, CHECKPOINTS_DIR),
                env.local_rank == 0,
            )
        staging = storage.local_path(storage.join(config.output_uri, CHECKPOINTS_DIR))
        return cls(staging, None, env.rank == 0)


def run_meta(config: TrainConfig, env: DistEnv, dataset_key: str) -> dict[str, Any]:
    """What every checkpoint records about the run, and a resumed one must match."""
    t = config.training
    return {
        "run": config.run,
        "dataset": dataset_key,
        "method": config.method,
        "globalBatch": t.micro_batch_size * t.gradient_accumulation_steps * env.world_size,
        "worldSize": env.world_size,
        "zeroStage": config.distributed.zero_stage,
        "attempt": attempt(),
    }


def resume_point(
    staging: Path,
    remote_root: str | None,
    s3: S3Settings,
    *,
    leader: bool,
    is_rank_zero: bool,
    nodes: int,
) -> Path | None:
    """The newest intact checkpoint, local or remote, as a local directory (None: start fresh).

    Every rank calls this. Rank 0 chooses: newest first, it fetches a remote checkpoint the local
    disk lacks and verifies every file's sha256; a checkpoint that fails is warned about and the
    previous complete one is tried. The other staging leaders (one per node, S3 outputs) fetch
    and verify the chosen one; everyone waits for them. Several nodes staging for S3 resume only
    from the bucket: rank 0's disk says nothing about the other nodes' disks.
    """
    if leader:
        staging.mkdir(parents=True, exist_ok=True)
        recover(staging)
    choice: list[Checkpoint | None] = [None]
    if is_rank_zero:
        local_only_counts = remote_root is None or nodes == 1
        found = [(c.step, 1, c) for c in local_checkpoints(staging)] if local_only_counts else []
        if remote_root is not None:
            found += [(c.step, 0, c) for c in remote_checkpoints(remote_root, s3)]
        newest_first = [c for _, _, c in sorted(found, key=lambda e: e[:2], reverse=True)]
        choice = [next((c for c in newest_first if _intact(c, staging, s3)), None)]
    distributed = torch.distributed.is_initialized()
    if distributed:
        torch.distributed.broadcast_object_list(choice, src=0)
    chosen = choice[0]
    if chosen is None:
        return None
    target = staging / checkpoint_name(chosen.step)
    if leader and not is_rank_zero and not _intact(chosen, staging, s3):
        raise storage.StorageError(
            f"{chosen.location}: the copy fetched to {target} does not match its checksums, "
            "though rank 0 verified the same checkpoint — a transfer went wrong; retried"
        )
    if distributed:
        torch.distributed.barrier()
    log.info("resuming from %s (step %d)", chosen.location, chosen.step)
    return target


def _intact(chosen: Checkpoint, staging: Path, s3: S3Settings) -> bool:
    """The checkpoint is in staging (fetched if it is remote) and every file matches COMPLETE."""
    target = staging / checkpoint_name(chosen.step)
    if read_marker(target, verify=True) is None and chosen.location != str(target):
        storage.download_dir(chosen.location, target, s3)
    if read_marker(target, verify=True) is not None:
        return True
    log.warning(
        "checkpoint %s failed verification; falling back to the previous complete checkpoint",
        chosen.location,
    )
    return False


#: What a checkpoint must share with the run that resumes it, and why (for the message).
RESUME_KEYS = {
    "dataset": "the dataset key (data or tokenizer changed): its rows are other rows",
    "method": "the training method",
    "globalBatch": "the global batch (micro batch × accumulation × processes): the data "
    "position and the learning-rate schedule count in its steps",
}


def refuse_mismatch(meta: dict[str, Any], now: dict[str, Any], location: str) -> bool:
    """Exit 2 if the checkpoint is of another run shape (see RESUME_KEYS), or sharded by ZeRO-3
    for another number of processes. True when it is sharded by ZeRO-1/2 for another number of
    processes: then it resumes through a DeepSpeed universal checkpoint (`to_universal`)."""
    for key, what in RESUME_KEYS.items():
        if key in meta and meta[key] != now[key]:
            raise InvalidInput(
                f"{location}: this checkpoint has {key} {meta[key]!r}, the run now has "
                f"{now[key]!r} — {what}. Resume with the settings it was written with, or give "
                "the changed run a new output.uri (or delete its checkpoints/) to start afresh"
            )
    zero = max(int(meta.get("zeroStage", 0)), int(now["zeroStage"]))
    if zero == 0 or meta.get("worldSize", now["worldSize"]) == now["worldSize"]:
        return False
    if zero >= 3 or int(meta.get("zeroStage", 0)) != int(now["zeroStage"]):
        raise InvalidInput(
            f"{location}: written by {meta['worldSize']} processes under ZeRO stage "
            f"{meta.get('zeroStage', 0)}, this run has {now['worldSize']} under stage "
            f"{now['zeroStage']} — kubetrain converts ZeRO-1/2 checkpoints to DeepSpeed universal "
            "checkpoints for another process count, not ZeRO-3 ones nor a changed stage (not "
            f"proven here): resume with {meta['worldSize']} processes, or start afresh in a new "
            "output.uri"
        )
    return True


def find_resume_point(
    config: TrainConfig, layout: CheckpointLayout, env: DistEnv, meta_now: dict[str, Any], args: Any
) -> tuple[StreamPosition, bool]:
    """Where the run continues: the newest intact checkpoint that fits this run (exit 2 for one
    that does not), or step 0. A ZeRO-1/2 checkpoint of another process count is converted to a
    universal checkpoint (by each staging leader, the others wait) and loaded as one. The gate
    judges the first steps of a fresh start: a sanity stage never resumes (resuming a finished
    gate would judge no steps)."""
    resume = (
        None
        if config.sanity is not None
        else resume_point(
            layout.staging,
            layout.remote_root,
            config.s3,
            leader=layout.finalizer,
            is_rank_zero=env.rank == 0,
            nodes=env.nodes,
        )
    )
    meta = read_marker(resume) if resume is not None else None
    if resume is not None and meta is not None and refuse_mismatch(meta, meta_now, str(resume)):
        if layout.finalizer:
            to_universal(resume, int(meta["step"]))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True
        log.info(
            "resuming %d processes from a checkpoint of %d (universal checkpoint)",
            env.world_size,
            meta["worldSize"],
        )
    position = StreamPosition(
        start_step=int(meta["step"]) if meta else 0,
        start_sample=int(meta["samplesConsumed"]) if meta else 0,
        samples_per_step=int(meta_now["globalBatch"]),
    )
    return position, resume is not None


def to_universal(directory: Path, step: int) -> None:
    """Convert the ZeRO-1/2 shards of a checkpoint (`global_stepN/`) into a DeepSpeed universal
    checkpoint beside them (`global_stepN_universal/`, `latest_universal`), once, with DeepSpeed's
    own `ds_to_universal`; any number of processes can load that (`load_universal`)."""
    source, target = directory / f"global_step{step}", directory / f"global_step{step}_universal"
    if (directory / "latest_universal").exists() and target.is_dir():
        return
    shutil.rmtree(target, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(target),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",  # Trainer's ZeRO-1/2 checkpoints lack the version marker
    ]
    log.info("checkpoint %s: converting to a universal checkpoint", directory.name)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InvalidInput(
            f"{directory}: DeepSpeed could not convert this checkpoint to a universal checkpoint "
            f"for another process count ({done.stderr.strip().splitlines()[-1:]}) — resume with "
            "the process count it was written with"
        )
    # The converted files are the trainer's own: listed, they pass the next resume's check.
    meta = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    write_marker(directory, {**meta, "files": {**meta["files"], **files_of(directory)}})


class CheckpointCallback(TrainerCallback):
    """Turns HF's `checkpoint-N/` into a complete `step-N/` once every rank has written its part.

    The finalizer is global rank 0 when the staging directory is the (shared) output, and each
    node's local rank 0 when it is node-local staging for an S3 output.
    """

    def __init__(
        self,
        *,
        staging: Path,
        finalizer: bool,
        keep: int,
        position: StreamPosition,
        run_meta: dict[str, Any],
        metrics: TrainerMetrics | None,
    ) -> None:
        self.staging, self.finalizer, self.keep = staging, finalizer, keep
        self.position, self.run_meta, self.metrics = position, run_meta, metrics
        self.uploader: Uploader | None = None
        """Set for S3 outputs on the finalizing ranks."""
        self.last_step: int | None = None
        self._save_started = time.perf_counter()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._save_started = time.perf_counter()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._save_started = time.perf_counter()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files are written and closed
        self.last_step = step
        if not self.finalizer:
            return
        written = self.staging / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        meta = {
            **self.run_meta,
            "step": step,
            "samplesConsumed": self.position.at(step),
            "time": time.time(),
            "files": files_of(written),
        }
        write_marker(written, meta)
        target = self.staging / checkpoint_name(step)
        shutil.rmtree(target, ignore_errors=True)
        written.rename(target)
        storage.fsync(self.staging)
        seconds = time.perf_counter() - self._save_started
        log.info("checkpoint %s: complete in %.2fs", target.name, seconds)
        self.rotate()
        if self.uploader is not None:
            self.uploader.submit(target, seconds)
        else:
            self.completed(step, seconds)

    def completed(self, step: int, seconds: float) -> None:
        """A checkpoint is durable in the output store (called from the upload thread for S3)."""
        if self.metrics is None:
            return
        labels = {"run": self.metrics.run}
        self.metrics.checkpoint_saves.labels(**labels).inc()
        self.metrics.checkpoint_last_step.labels(**labels).set(step)
        self.metrics.checkpoint_last_timestamp.labels(**labels).set(time.time())
        self.metrics.checkpoint_save_duration.labels(**labels).observe(seconds)

    def rotate(self) -> None:
        """Keep the newest `keep` complete checkpoints (and any the uploader still needs)."""
        busy = self.uploader.busy() if self.uploader is not None else set()
        for old in local_checkpoints(self.staging)[: -self.keep]:
            if Path(old.location) not in busy:
                shutil.rmtree(old.location, ignore_errors=True)


class SignalStop(TrainerCallback):
    """SIGTERM/SIGINT: finish the step, save a checkpoint, stop; `stopped` tells run() to exit 143.

    The flag is summed across ranks by the telemetry callback's per-step all-reduce (which must run
    first), so all ranks stop after the same step even if the signal reached them at different ones.
    """

    def __init__(self, accounting: StepAccounting) -> None:
        self.accounting, self.stopped = accounting, False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.accounting.stop_everywhere and state.global_step < state.max_steps:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True
            log.warning("termination signal: saving step %d and stopping", state.global_step)
