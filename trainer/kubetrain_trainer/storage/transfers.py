"""Writing, copying and deleting objects and files, single and as directory trees.

Local writes are atomic (`atomic.write_atomic`); on S3 an object appears whole or not at all,
so a tree is complete when its marker object, uploaded last, is there. Directory downloads are
incremental: what was already fetched (same size and ETag) is not fetched again.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage import hub
from kubetrain_trainer.storage.atomic import write_atomic
from kubetrain_trainer.storage.errors import NotFound, Refused, StorageError, unreadable
from kubetrain_trainer.storage.s3 import client, list_objects, s3_errors, transfer_config
from kubetrain_trainer.storage.uris import contained, is_hf, is_s3, join, local_path, split_s3

log = logging.getLogger(__name__)

#: Where download_dir remembers what it fetched (object ETag and size per relative path).
DOWNLOAD_STATE = ".kubetrain-download.json"


def write_text(uri: str, text: str, s3: S3Settings | None = None) -> None:
    """Write a small text object: atomically on local disks, one PUT on S3."""
    data = text.encode("utf-8")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            client(s3).put_object(Bucket=bucket, Key=key, Body=data)
        return
    write_atomic(local_path(uri), lambda f: f.write(data))


def upload_file(
    path: Path,
    uri: str,
    s3: S3Settings | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Copy one local file to uri (multipart on S3 above the threshold; atomic locally).

    `metadata` becomes the object's user metadata on S3 (`x-amz-meta-*`, read back by `head`);
    local files have nowhere to keep it and ignore it.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = {"Metadata": dict(metadata)} if metadata else None
        with s3_errors(uri):
            client(s3).upload_file(
                str(path), bucket, key, ExtraArgs=extra, Config=transfer_config()
            )
        return
    with path.open("rb") as src:
        write_atomic(local_path(uri), lambda f: shutil.copyfileobj(src, f, 1 << 20))


def download_file(uri: str, path: Path, s3: S3Settings | None = None) -> None:
    """Copy one object or file to a local path (multipart ranged GETs on S3; atomic)."""
    if not is_s3(uri):
        try:
            upload_file(local_path(uri), str(path))
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        except PermissionError:
            raise Refused(unreadable(uri)) from None
        return
    bucket, key = split_s3(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: processes of two nodes may share this directory on a PVC.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        with s3_errors(uri):
            client(s3).download_file(bucket, key, name, Config=transfer_config())
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def upload_dir(
    local_dir: Path,
    uri: str,
    s3: S3Settings | None = None,
    marker: str | Sequence[str] | None = None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Copy a directory tree to uri in a stable order; the `marker` file(s) go last, in order.

    Readers that wait for the (last) marker never see a half-copied tree. `metadata` maps a
    relative path to the user metadata of its object (S3 only, see `upload_file`).
    """
    files = _relative_files(local_dir)
    last = [marker] if isinstance(marker, str) else list(marker or ())
    missing = [m for m in last if m not in files]
    if missing:
        raise StorageError(f"{local_dir}: marker {missing[0]} is missing; nothing uploaded")
    for rel in [f for f in files if f not in last] + last:
        upload_file(local_dir / rel, join(uri, rel), s3, (metadata or {}).get(rel))


def delete(uri: str, s3: S3Settings | None = None) -> None:
    """Remove one object or file; absent already is fine."""
    if not is_s3(uri):
        local_path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    with s3_errors(uri):
        client(s3).delete_object(Bucket=bucket, Key=key)


def refuse_clashes(uri: str, keys: Sequence[str]) -> None:
    """Exit 2 when one key is a file and another's directory (`a` and `a/b`): S3 holds both, a
    disk cannot, and no retry changes the bucket. Checked before anything is fetched."""
    names = set(keys)
    for key in sorted(keys):
        parts = key.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in names:
                raise Refused(
                    f"{join(uri, parent)} and {join(uri, key)}: one key is a file and the "
                    "other's directory, which a disk cannot hold — delete or rename one of them"
                )


def download_dir(
    uri: str, dest: Path, s3: S3Settings | None = None, patterns: Sequence[str] | None = None
) -> Path:
    """A local directory with the tree at uri: local trees as they are, S3 prefixes fetched once.

    An S3 prefix is copied into `dest`; files already there with the same size and ETag (recorded
    in `dest/.kubetrain-download.json`) are not fetched again. `patterns` (fnmatch on the relative
    path) limits what is fetched, e.g. only the tokenizer files of a model directory. Every key
    is checked before anything is fetched: one that would land outside `dest`, or one that is
    another's directory (`config.json` beside `config.json/x`), refuses the whole prefix
    (exit 2). `hf://` repositories are fetched by `huggingface_hub` into `dest`.
    """
    if is_hf(uri):
        return hub.download(uri, dest, patterns)
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_dir():
            raise NotFound(f"{uri}: no such directory")
        return path
    state_path = dest / DOWNLOAD_STATE
    state: dict[str, list[Any]] = {}
    if state_path.exists():
        state = json.loads(state_path.read_text(encoding="utf-8"))
    wanted = [
        obj
        for obj in list_objects(uri, s3)
        if patterns is None or any(fnmatch.fnmatch(obj[0], p) for p in patterns)
    ]
    if not wanted:
        raise NotFound(f"{uri}: no objects under this prefix")
    refuse_clashes(uri, [rel for rel, _, _ in wanted])
    targets = [contained(dest, rel, uri) for rel, _, _ in wanted]
    for (rel, nbytes, etag), target in zip(wanted, targets, strict=True):
        if state.get(rel) == [nbytes, etag] and target.exists() and target.stat().st_size == nbytes:
            continue
        download_file(join(uri, rel), target, s3)
        state[rel] = [nbytes, etag]
        write_text(str(state_path), json.dumps(state, sort_keys=True))
    log.info("%s: %d files in %s", uri, len(wanted), dest)
    return dest
