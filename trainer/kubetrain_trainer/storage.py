"""Every URI a stage reads or writes: local paths, `file://`, `pvc://CLAIM/path` and `s3://`.

One module so that the preprocess stage, the trainer and the merge stage agree on what a URI means:

* a bare path or `file:///abs/path` is a local file;
* `pvc://CLAIM/path` is `$KUBETRAIN_PVC_ROOT/CLAIM/path` (default `/mnt/pvc`), where the operator
  mounts the claim;
* `s3://bucket/key` goes through boto3 with the endpoint and region of `config.S3Settings`; the
  credentials come from the environment (`AWS_*` from a Secret, or IRSA), never from a config.

Large objects move with boto3's transfer manager (multipart, retries, checksums). Its thresholds are
tuned with `KUBETRAIN_S3_MULTIPART_THRESHOLD` and `KUBETRAIN_S3_MULTIPART_CHUNKSIZE` (bytes); S3
refuses parts below 5 MiB. Local writes are atomic (temp file + fsync + rename); on S3 an object
appears whole or not at all, so "atomic" there means writing the marker object last.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kubetrain_trainer.config import S3Settings

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

log = logging.getLogger(__name__)

PVC_ROOT_ENV = "KUBETRAIN_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
MULTIPART_THRESHOLD_ENV = "KUBETRAIN_S3_MULTIPART_THRESHOLD"
MULTIPART_CHUNKSIZE_ENV = "KUBETRAIN_S3_MULTIPART_CHUNKSIZE"
#: Large enough that a 1 GiB shard is 16 requests, small enough to retry a part cheaply.
DEFAULT_MULTIPART_BYTES = 64 * 1024 * 1024
#: Where download_dir remembers what it fetched (object ETag and size per relative path).
DOWNLOAD_STATE = ".kubetrain-download.json"
_READ_RETRIES = 5


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message names the URI and what to do."""


class NotFound(StorageError):
    """The object or file does not exist."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """`uri/part/part`, keeping the scheme (`s3://b/p` + `x` → `s3://b/p/x`)."""
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if "://" in uri:
        return "/".join([uri.rstrip("/"), *clean])
    return str(Path(uri).joinpath(*clean))


def local_path(uri: str) -> Path:
    """The filesystem path of a local, `file://` or `pvc://` URI."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("pvc://"):
        root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return root / uri[len("pvc://") :]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(
            f"{uri}: {scheme}:// cannot be read by this stage — use s3://, pvc://, file:// or a "
            "local path (models from the hub must be downloaded to one of these first)"
        )
    return Path(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/x` → (`bucket`, `key/x`)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an s3:// URI needs a bucket: s3://BUCKET/KEY")
    return bucket, key


@functools.lru_cache(maxsize=8)
def client(s3: S3Settings | None = None) -> Any:
    """A boto3 S3 client for these settings (cached; boto3 clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    settings = s3 or S3Settings()
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint or None,
        region_name=settings.region or None,
        config=Config(retries={"max_attempts": 10, "mode": "adaptive"}),
    )


def transfer_config() -> TransferConfig:
    """Multipart thresholds from the environment (tests lower them to exercise multipart)."""
    from boto3.s3.transfer import TransferConfig

    threshold = int(os.environ.get(MULTIPART_THRESHOLD_ENV, DEFAULT_MULTIPART_BYTES))
    chunksize = int(os.environ.get(MULTIPART_CHUNKSIZE_ENV, threshold))
    return TransferConfig(
        multipart_threshold=threshold, multipart_chunksize=chunksize, max_concurrency=8
    )


def _client_error(uri: str, error: Exception) -> StorageError:
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        return NotFound(f"{uri}: does not exist ({code}) — check the bucket and key")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(
            f"{uri}: access denied ({code}) — check the AWS_* credentials of the pod and the "
            "bucket policy"
        )
    return StorageError(f"{uri}: S3 request failed: {error}")


def _head(uri: str, s3: S3Settings | None) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return dict(client(s3).head_object(Bucket=bucket, Key=key))
    except ClientError as error:
        raise _client_error(uri, error) from None


@dataclass(frozen=True)
class ObjectInfo:
    """What one HEAD tells about an object (locally: the size; no ETag, no metadata)."""

    size: int
    etag: str
    metadata: dict[str, str]


def head(uri: str, s3: S3Settings | None = None) -> ObjectInfo:
    """Size, ETag and user metadata (`x-amz-meta-*`, keys lower-case) without reading the data."""
    if is_s3(uri):
        found = _head(uri, s3)
        return ObjectInfo(
            int(found["ContentLength"]),
            str(found["ETag"]).strip('"'),
            {str(k).lower(): str(v) for k, v in found.get("Metadata", {}).items()},
        )
    return ObjectInfo(size(uri), "", {})


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_uri(uri: str, s3: S3Settings | None = None) -> str:
    """sha256 (hex) of an object's bytes, streamed: one full read, constant memory."""
    digest = hashlib.sha256()
    with open_binary(uri, s3) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(uri: str, s3: S3Settings | None = None) -> str:
    """Content identity: `sha256:<hex>` of a local file, `etag:<etag>:<size>` of an S3 object."""
    if is_s3(uri):
        head = _head(uri, s3)
        return f"etag:{str(head['ETag']).strip(chr(34))}:{head['ContentLength']}"
    path = local_path(uri)
    try:
        return f"sha256:{sha256_file(path)}"
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory — name the files") from None


def size(uri: str, s3: S3Settings | None = None) -> int:
    if is_s3(uri):
        return int(_head(uri, s3)["ContentLength"])
    try:
        return local_path(uri).stat().st_size
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    if not is_s3(uri):
        return local_path(uri).exists()
    try:
        _head(uri, s3)
    except NotFound:
        return False
    return True


class _S3Raw(io.RawIOBase):
    """A streaming S3 body that resumes with a Range request (pinned to the ETag) if it breaks."""

    def __init__(self, uri: str, s3: S3Settings | None) -> None:
        self.uri, self.s3, self.pos = uri, s3, 0
        self.bucket, self.key = split_s3(uri)
        self.etag = ""
        self.body = self._open()

    def _open(self) -> Any:
        from botocore.exceptions import ClientError

        extra: dict[str, str] = {}
        if self.pos:
            extra = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag}
        try:
            response = client(self.s3).get_object(Bucket=self.bucket, Key=self.key, **extra)
        except ClientError as error:
            raise _client_error(self.uri, error) from None
        self.etag = self.etag or str(response["ETag"])
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError

        view = memoryview(buffer).cast("B")
        for attempt in range(_READ_RETRIES):
            try:
                data = self.body.read(len(view))
                break
            except (OSError, BotoCoreError) as error:
                if attempt == _READ_RETRIES - 1:
                    raise StorageError(
                        f"{self.uri}: read failed at byte {self.pos}: {error}"
                    ) from error
                log.warning("%s: read broke at byte %d (%s); resuming", self.uri, self.pos, error)
                self.body = self._open()
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def open_binary(uri: str, s3: S3Settings | None = None) -> IO[bytes]:
    """A buffered streaming reader; S3 objects are never held whole in memory."""
    if is_s3(uri):
        return io.BufferedReader(_S3Raw(uri, s3), buffer_size=1 << 20)
    try:
        return local_path(uri).open("rb")
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None


def read_text(uri: str, s3: S3Settings | None = None) -> str:
    with open_binary(uri, s3) as f:
        return f.read().decode("utf-8")


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (what makes a rename in it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_local(path: Path, fill: Any) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str, s3: S3Settings | None = None) -> None:
    """Write a small text object: atomically on local disks, one PUT on S3."""
    data = text.encode("utf-8")
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            client(s3).put_object(Bucket=bucket, Key=key, Body=data)
        except ClientError as error:
            raise _client_error(uri, error) from None
        return
    _atomic_local(local_path(uri), lambda f: f.write(data))


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
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        extra = {"Metadata": dict(metadata)} if metadata else None
        try:
            client(s3).upload_file(
                str(path), bucket, key, ExtraArgs=extra, Config=transfer_config()
            )
        except (ClientError, S3UploadFailedError) as error:
            raise _client_error(uri, error) from None
        return
    with path.open("rb") as src:
        _atomic_local(local_path(uri), lambda f: shutil.copyfileobj(src, f, 1 << 20))


def download_file(uri: str, path: Path, s3: S3Settings | None = None) -> None:
    """Copy one object or file to a local path (multipart ranged GETs on S3; atomic)."""
    if not is_s3(uri):
        upload_file(local_path(uri), str(path))
        return
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: processes of two nodes may share this directory on a PVC.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        client(s3).download_file(bucket, key, name, Config=transfer_config())
        os.replace(name, path)
    except ClientError as error:
        raise _client_error(uri, error) from None
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
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        client(s3).delete_object(Bucket=bucket, Key=key)
    except ClientError as error:
        raise _client_error(uri, error) from None


def list_objects(uri: str, s3: S3Settings | None = None) -> Iterator[tuple[str, int, str]]:
    """(relative path, size, ETag) of every object under an S3 prefix, paginated."""
    from botocore.exceptions import ClientError

    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = client(s3).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = str(obj["Key"])[len(prefix) :]
                if rel and not rel.endswith("/"):
                    yield rel, int(obj["Size"]), str(obj["ETag"]).strip('"')
    except ClientError as error:
        raise _client_error(uri, error) from None


def download_dir(
    uri: str, dest: Path, s3: S3Settings | None = None, patterns: Sequence[str] | None = None
) -> Path:
    """A local directory with the tree at uri: local trees as they are, S3 prefixes fetched once.

    An S3 prefix is copied into `dest`; files already there with the same size and ETag (recorded
    in `dest/.kubetrain-download.json`) are not fetched again. `patterns` (fnmatch on the relative
    path) limits what is fetched, e.g. only the tokenizer files of a model directory.
    """
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
    for rel, nbytes, etag in wanted:
        target = dest / rel
        if state.get(rel) == [nbytes, etag] and target.exists() and target.stat().st_size == nbytes:
            continue
        download_file(join(uri, rel), target, s3)
        state[rel] = [nbytes, etag]
        write_text(str(state_path), json.dumps(state, sort_keys=True))
    log.info("%s: %d files in %s", uri, len(wanted), dest)
    return dest
