"""Reading objects and files: metadata, content identity, streaming reads.

S3 objects are streamed, never held whole in memory; a stream that breaks resumes with a Range
request pinned to the object's ETag, so a resumed read never mixes two versions of an object. A
read may also be pinned to the version seen when the object was fingerprinted (`Pin`): a replaced
object then fails the read (`Changed`, retryable) instead of handing over other content.

Local files are opened without blocking and refused unless they are regular files (a FIFO or
`/dev/zero` would never end a read); `check_local_input` also refuses, before any read, an input
that resolves outside its claim or directory (a symlink to `/proc/self/environ` would copy the
pod's environment, credentials included, into a dataset).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage.errors import NotFound, Refused, StorageError, unreadable
from kubetrain_trainer.storage.s3 import client, head_object, s3_errors
from kubetrain_trainer.storage.uris import input_root, is_s3, local_path, split_s3

log = logging.getLogger(__name__)

_READ_RETRIES = 5
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory", "name the files, or end it with '/'"),
    (stat.S_ISFIFO, "a FIFO", "name a regular file"),
    (stat.S_ISCHR, "a character device", "name a regular file"),
    (stat.S_ISBLK, "a block device", "name a regular file"),
    (stat.S_ISSOCK, "a socket", "name a regular file"),
)


class Changed(StorageError):
    """The content is not what was fingerprinted: retried (exit 1), and the next attempt keys
    the dataset on the content there then."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"{uri}: the input changed while the stage read it — its bytes no longer match the "
            "fingerprint the cache key was computed from; nothing was published. The stage is "
            "retried and keys the dataset on the new content (do not rewrite inputs a run reads)"
        )


@dataclass(frozen=True)
class Pin:
    """The version of an object a read must return (its ETag, and VersionId where versioned)."""

    etag: str
    version_id: str | None = None

    def get_args(self) -> dict[str, str]:
        """get_object's arguments that make S3 refuse (412) any other version."""
        args = {"IfMatch": self.etag}
        if self.version_id:
            args["VersionId"] = self.version_id
        return args


@dataclass(frozen=True)
class Identity:
    """What a stage keys its output on: `fingerprint`, `size`, and the S3 version to read."""

    fingerprint: str
    size: int
    pin: Pin | None = None


@dataclass(frozen=True)
class ObjectInfo:
    """What one HEAD tells about an object (locally: the size; no ETag, no metadata)."""

    size: int
    etag: str
    metadata: dict[str, str]


def head(uri: str, s3: S3Settings | None = None) -> ObjectInfo:
    """Size, ETag and user metadata (`x-amz-meta-*`, keys lower-case) without reading the data."""
    if is_s3(uri):
        found = head_object(uri, s3)
        return ObjectInfo(
            int(found["ContentLength"]),
            str(found["ETag"]).strip('"'),
            {str(k).lower(): str(v) for k, v in found.get("Metadata", {}).items()},
        )
    return ObjectInfo(size(uri), "", {})


def _not_regular(uri: str, mode: int) -> Refused:
    kind, fix = next(
        ((name, fix) for test, name, fix in _FILE_KINDS if test(mode)),
        ("not a regular file", "name a regular file"),
    )
    return Refused(f"{uri}: is {kind}, not a regular file — {fix} (nothing was read from it)")


def _open_regular(path: Path, uri: str) -> io.BufferedReader:
    """`path` opened for reading if it is a regular file; refused (exit 2) otherwise.

    Opened non-blocking, so that a FIFO without a writer does not wait forever, and checked on
    the descriptor itself, so that what is checked is what is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None
    except PermissionError:
        raise Refused(unreadable(uri)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(uri, mode)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_local_input(uri: str, root: Path | None = None) -> None:
    """Refuse, before any read, a local input that is not a regular file inside `root`
    (default: its claim for `pvc://`, the directory it is named in otherwise).

    A symlink out of the tree (to `/proc/self/environ`, another claim, a mounted Secret) or a
    FIFO, device or directory is exit 2 naming the entry: reading it would put the pod's state
    into a dataset, or never end.
    """
    path = local_path(uri)
    if not os.path.lexists(path):
        raise NotFound(f"{uri}: no such file")
    try:
        resolved = path.resolve()
    except RuntimeError:  # Python 3.11's answer to a symlink loop
        raise Refused(f"{uri}: is a symlink loop — name a regular file") from None
    try:
        mode = resolved.stat().st_mode  # stat, not open: opening a FIFO or device may block
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file (a link to {resolved}, which is absent)") from None
    except PermissionError:
        raise Refused(unreadable(uri)) from None
    if not stat.S_ISREG(mode):
        raise _not_regular(uri, mode)
    tree = (root if root is not None else input_root(uri)).resolve()
    if not resolved.is_relative_to(tree):
        raise Refused(
            f"{uri}: is a link to {resolved}, outside {tree} — inputs must be regular files "
            "inside their claim or directory: copy the file there instead of linking to it"
        )


def sha256_file(path: Path) -> str:
    with _open_regular(path, str(path)) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_uri(uri: str, s3: S3Settings | None = None) -> str:
    """sha256 (hex) of an object's bytes, streamed: one full read, constant memory."""
    digest = hashlib.sha256()
    with open_binary(uri, s3) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def identify(uri: str, s3: S3Settings | None = None) -> Identity:
    """Content identity: `sha256:<hex>` of a local file; `etag:<etag>:<size>` of an S3 object,
    with the Pin that makes later reads return that version or fail."""
    if is_s3(uri):
        found = head_object(uri, s3)
        etag, nbytes = str(found["ETag"]), int(found["ContentLength"])
        version = found.get("VersionId")
        fingerprint = f"etag:{etag.strip(chr(34))}:{nbytes}"
        return Identity(fingerprint, nbytes, Pin(etag, str(version) if version else None))
    with _open_regular(local_path(uri), uri) as f:
        nbytes = os.fstat(f.fileno()).st_size
        return Identity(f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}", nbytes)


def size(uri: str, s3: S3Settings | None = None) -> int:
    if is_s3(uri):
        return int(head_object(uri, s3)["ContentLength"])
    try:
        return local_path(uri).stat().st_size
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    if not is_s3(uri):
        return local_path(uri).exists()
    try:
        head_object(uri, s3)
    except NotFound:
        return False
    return True


@contextlib.contextmanager
def _pinned(uri: str) -> Iterator[None]:
    """S3's 412 to a pinned read: the object was replaced since it was seen → `Changed`."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise Changed(uri) from None
        raise


class _S3Raw(io.RawIOBase):
    """A streaming S3 body that resumes with a Range request (pinned to the ETag) if it breaks."""

    def __init__(self, uri: str, s3: S3Settings | None, pin: Pin | None) -> None:
        self.uri, self.s3, self.pos, self.pin = uri, s3, 0, pin
        self.bucket, self.key = split_s3(uri)
        self.etag = pin.etag if pin else ""
        self.body = self._open()

    def _open(self) -> Any:
        extra = self.pin.get_args() if self.pin else {}
        if self.pos:
            extra |= {"Range": f"bytes={self.pos}-", "IfMatch": self.etag}
        with s3_errors(self.uri), _pinned(self.uri):
            response = client(self.s3).get_object(Bucket=self.bucket, Key=self.key, **extra)
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


def open_binary(uri: str, s3: S3Settings | None = None, pin: Pin | None = None) -> IO[bytes]:
    """A buffered streaming reader; S3 objects are never held whole in memory, and with a
    `pin` they are read at that version or not at all (`Changed`). Local files must be regular."""
    if is_s3(uri):
        return io.BufferedReader(_S3Raw(uri, s3, pin), buffer_size=1 << 20)
    return _open_regular(local_path(uri), uri)


def read_text(uri: str, s3: S3Settings | None = None) -> str:
    with open_binary(uri, s3) as f:
        return f.read().decode("utf-8")
