"""Reading objects and files: metadata, content identity, streaming reads.

S3 objects are streamed, never held whole in memory; a stream that breaks resumes with a Range
request pinned to the object's ETag, so a resumed read never mixes two versions of an object.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage.errors import NotFound, Refused, StorageError, unreadable
from kubetrain_trainer.storage.s3 import client, head_object, s3_errors
from kubetrain_trainer.storage.uris import is_s3, local_path, split_s3

log = logging.getLogger(__name__)

_READ_RETRIES = 5


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
        found = head_object(uri, s3)
        return f"etag:{str(found['ETag']).strip(chr(34))}:{found['ContentLength']}"
    path = local_path(uri)
    try:
        return f"sha256:{sha256_file(path)}"
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise Refused(f"{uri}: is a directory — name the files, or end it with '/'") from None
    except PermissionError:
        raise Refused(unreadable(uri)) from None


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


class _S3Raw(io.RawIOBase):
    """A streaming S3 body that resumes with a Range request (pinned to the ETag) if it breaks."""

    def __init__(self, uri: str, s3: S3Settings | None) -> None:
        self.uri, self.s3, self.pos = uri, s3, 0
        self.bucket, self.key = split_s3(uri)
        self.etag = ""
        self.body = self._open()

    def _open(self) -> Any:
        extra: dict[str, str] = {}
        if self.pos:
            extra = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag}
        with s3_errors(self.uri):
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


def open_binary(uri: str, s3: S3Settings | None = None) -> IO[bytes]:
    """A buffered streaming reader; S3 objects are never held whole in memory."""
    if is_s3(uri):
        return io.BufferedReader(_S3Raw(uri, s3), buffer_size=1 << 20)
    try:
        return local_path(uri).open("rb")
    except FileNotFoundError:
        raise NotFound(f"{uri}: no such file") from None
    except PermissionError:
        raise Refused(unreadable(uri)) from None


def read_text(uri: str, s3: S3Settings | None = None) -> str:
    with open_binary(uri, s3) as f:
        return f.read().decode("utf-8")
