"""Arrow IPC shards, the manifest and atomic publication of a dataset under its cache key.

Output bytes depend only on the sequence of rows: record batches are cut at BATCH_BYTES and shards
at SHARD_BYTES by row sizes, never by how the rows arrived. A dataset is built in a staging
directory and becomes visible in one step: a rename on local disks (same filesystem), `_SUCCESS`
uploaded last on S3. Staging directories of killed runs are found by their unlocked lock files and
removed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.preprocess.dataset import MANIFEST, SHA256_METADATA, SUCCESS, shard_files

log = logging.getLogger(__name__)

#: One record batch holds at most this many bytes of tokens (the trainer reads batch by batch).
BATCH_BYTES = 8 << 20
#: A shard holds at most this many bytes: large files, few objects, parts of ≤ 64 MiB on S3.
SHARD_BYTES = 1 << 30


def _lengths(array: pa.ListArray) -> np.ndarray:
    """List lengths from the offsets buffer (to_numpy would import pandas: +50 MB of RSS)."""
    offsets = array.offsets
    values = np.frombuffer(offsets.buffers()[1], dtype=np.int32)
    return np.diff(values[offsets.offset : offsets.offset + len(offsets)])


def _row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    """Bytes of each row: 4 per token plus 4 per list offset, over all columns."""
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        sizes += 4 * _lengths(column) + 4
    return sizes


@dataclass
class SplitWriter:
    """The shards of one split: `<split>-00000.arrow`, …"""

    directory: Path
    split: str
    schema: pa.Schema
    shards: list[dict[str, Any]] = field(default_factory=list)
    pending: list[pa.RecordBatch] = field(default_factory=list)
    pending_bytes: int = 0
    _file: Any = None
    _writer: Any = None
    _shard_rows: int = 0
    _shard_bytes: int = 0

    def write(self, batch: pa.RecordBatch | None) -> None:
        if batch is None or not batch.num_rows:
            return
        self.pending.append(batch)
        self.pending_bytes += int(_row_bytes(batch).sum())
        while self.pending_bytes >= BATCH_BYTES:
            self._emit()

    def _emit(self) -> None:
        """Write the longest prefix of the pending rows that fits BATCH_BYTES (at least one row)."""
        combined = pa.Table.from_batches(self.pending, schema=self.schema).combine_chunks()
        batch = combined.to_batches()[0]
        cumulative = np.cumsum(_row_bytes(batch))
        rows = max(1, int(np.searchsorted(cumulative, BATCH_BYTES, side="right")))
        self._write(batch.slice(0, rows), int(cumulative[rows - 1]))
        self.pending = [batch.slice(rows)] if rows < batch.num_rows else []
        self.pending_bytes = int(cumulative[-1] - cumulative[rows - 1])

    def _write(self, batch: pa.RecordBatch, nbytes: int) -> None:
        if self._writer is not None and self._shard_bytes + nbytes > SHARD_BYTES:
            self._close_shard()
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):05d}.arrow"
            self._file = pa.OSFile(str(self.directory / name), "wb")
            self._writer = pa.ipc.new_file(self._file, self.schema)
            self.shards.append({"file": name})
        self._writer.write_batch(batch)
        self._shard_rows += batch.num_rows
        self._shard_bytes += nbytes

    def _close_shard(self) -> None:
        self._writer.close()
        self._file.close()
        path = self.directory / self.shards[-1]["file"]
        storage.fsync(path)
        self.shards[-1].update(
            rows=self._shard_rows, bytes=path.stat().st_size, sha256=storage.sha256_file(path)
        )
        self._writer = self._file = None
        self._shard_rows = self._shard_bytes = 0

    def close(self) -> list[dict[str, Any]]:
        while self.pending:
            self._emit()
        if self._writer is not None:
            self._close_shard()
        return self.shards


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    storage.fsync(path)


def remove_abandoned(base: Path) -> None:
    """Delete staging directories whose owner died: nobody holds their lock any more."""
    for lock in base.glob(".tmp-*.lock"):
        with contextlib.suppress(FileNotFoundError), lock.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            log.info("removed the staging directory of an interrupted run: %s", lock.stem)
            lock.unlink(missing_ok=True)
    for path in base.glob(".tmp-*"):
        if path.is_dir() and not path.with_suffix(".lock").exists():
            shutil.rmtree(path, ignore_errors=True)
    for path in base.glob(".trash-*"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging(dataset_uri: str, key: str, workdir: Path) -> Iterator[Path]:
    """A private directory to build the dataset in; removed on exit unless published.

    Local datasets are staged next to their final place (same filesystem, so publishing is a
    rename); S3 datasets in the workdir. The lock file is created under a temporary name, locked,
    then renamed, so a visible lock is always held by a live run or by nobody.
    """
    base = workdir / ".kubetrain-staging" if storage.is_s3(dataset_uri) else None
    base = base or storage.local_path(dataset_uri).parent
    base.mkdir(parents=True, exist_ok=True)
    remove_abandoned(base)
    name = f".tmp-{key[:16]}-{uuid.uuid4().hex[:12]}"
    path, lock = base / name, base / f"{name}.lock"
    with (base / f".new-{name}").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        os.replace(base / f".new-{name}", lock)
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name[:16]}-{uuid.uuid4().hex[:12]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def discard(dataset_uri: str, s3: S3Settings | None = None) -> None:
    """Take a damaged dataset out of use before it is rebuilt.

    Local: moved out of the way (atomically) and deleted. S3: its `_SUCCESS` is deleted, so no
    reader takes it for complete; the rebuild overwrites every object and writes `_SUCCESS` last.
    """
    if storage.is_s3(dataset_uri):
        storage.delete(storage.join(dataset_uri, SUCCESS), s3)
        return
    with contextlib.suppress(FileNotFoundError):
        _discard(storage.local_path(dataset_uri))


def publish(staged: Path, dataset_uri: str, s3: S3Settings | None) -> bool:
    """Make the staged dataset visible; False if another run published the same key first.

    On S3 every shard object carries its sha256 as user metadata (`x-amz-meta-sha256`), so a
    cache hit can check it with one HEAD (`dataset.damaged_objects`).
    """
    if storage.is_s3(dataset_uri):
        manifest = json.loads((staged / MANIFEST).read_text(encoding="utf-8"))
        checksums = {s["file"]: {SHA256_METADATA: s["sha256"]} for s in shard_files(manifest)}
        storage.upload_dir(staged, dataset_uri, s3, marker=(MANIFEST, SUCCESS), metadata=checksums)
        return True
    final = storage.local_path(dataset_uri)
    for _ in range(2):
        try:
            os.rename(staged, final)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if (final / SUCCESS).exists():
                log.info("%s: published by another run meanwhile; keeping that copy", final)
                return False
            _discard(final)  # a damaged leftover without _SUCCESS
            continue
        storage.fsync(final.parent)
        return True
    raise OSError(f"{final}: cannot publish the dataset; remove the directory and rerun")
