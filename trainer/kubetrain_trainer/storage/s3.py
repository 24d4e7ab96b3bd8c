"""The S3 client, its transfer settings, and botocore's errors mapped to the contract's codes.

The client has the endpoint and region of `config.S3Settings`; the credentials come from the
environment (`AWS_*` from a Secret, or IRSA), never from a config. Large objects move with
boto3's transfer manager (multipart, retries, checksums), tuned with
`KUBETRAIN_S3_MULTIPART_THRESHOLD` and `KUBETRAIN_S3_MULTIPART_CHUNKSIZE` (bytes; S3 refuses parts
below 5 MiB). A missing object or refused credentials exit 2; throttling, 5xx answers and broken
connections exit 1 (the operator retries with backoff).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kubetrain_trainer.config import AWS_S3, S3Settings
from kubetrain_trainer.storage.credentials import S3_CREDENTIALS_FIELD, refuse_endpoint
from kubetrain_trainer.storage.errors import AccessDenied, NotFound, StorageError
from kubetrain_trainer.storage.uris import redacted, split_s3

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

MULTIPART_THRESHOLD_ENV = "KUBETRAIN_S3_MULTIPART_THRESHOLD"
MULTIPART_CHUNKSIZE_ENV = "KUBETRAIN_S3_MULTIPART_CHUNKSIZE"
#: Large enough that a 1 GiB shard is 16 requests, small enough to retry a part cheaply.
DEFAULT_MULTIPART_BYTES = 64 * 1024 * 1024
#: Attempts boto3 makes per request (adaptive retry mode); tests lower it.
MAX_ATTEMPTS_ENV = "KUBETRAIN_S3_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 10


@functools.lru_cache(maxsize=8)
def client(s3: S3Settings | None = None) -> Any:
    """A boto3 S3 client for these settings (cached; boto3 clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    settings = s3 or AWS_S3
    refuse_endpoint(settings)
    attempts = int(os.environ.get(MAX_ATTEMPTS_ENV, DEFAULT_MAX_ATTEMPTS))
    return boto3.session.Session().client(  # a session of its own: credentials read now
        "s3",
        endpoint_url=settings.endpoint or None,
        region_name=settings.region or None,
        config=Config(retries={"max_attempts": attempts, "mode": "adaptive"}),
    )


def transfer_config() -> TransferConfig:
    """Multipart thresholds from the environment (tests lower them to exercise multipart)."""
    from boto3.s3.transfer import TransferConfig

    threshold = int(os.environ.get(MULTIPART_THRESHOLD_ENV, DEFAULT_MULTIPART_BYTES))
    chunksize = int(os.environ.get(MULTIPART_CHUNKSIZE_ENV, threshold))
    return TransferConfig(
        multipart_threshold=threshold, multipart_chunksize=chunksize, max_concurrency=8
    )


_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_DENIED = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
    }
)
_CREDENTIALS_FIX = (
    f"check the Secret named by {S3_CREDENTIALS_FIELD} (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, or the pod's IRSA role) and the bucket policy"
)


def _client_error(uri: str, error: Exception) -> StorageError:
    """An S3 error answer → exit 2 (missing, denied) or a retryable failure (throttled, 5xx)."""
    response = getattr(error, "response", {})
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    uri = redacted(uri)
    if code in _NOT_FOUND:
        return NotFound(f"{uri}: does not exist ({code}) — check the bucket and key")
    if code in _DENIED:
        return AccessDenied(f"{uri}: access denied ({code}) — {_CREDENTIALS_FIX}")
    if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "503"):
        return StorageError(
            f"{uri}: S3 is throttling or failing ({code or status}) after retries — transient; "
            "the stage exits 1 to be retried later"
        )
    return StorageError(f"{uri}: S3 request failed ({code or status}): {error}")


def _transport_error(uri: str, error: Exception) -> StorageError:
    """No answer at all (no credentials, no connection) → a message instead of a traceback."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    uri = redacted(uri)
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return AccessDenied(f"{uri}: no S3 credentials in the pod ({error}) — {_CREDENTIALS_FIX}")
    return StorageError(
        f"{uri}: cannot reach the object store ({type(error).__name__}: {error}) — transient "
        "network trouble; the stage exits 1 to be retried (check s3.endpoint if it persists)"
    )


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Translate botocore's exceptions for `uri` into StorageError with the contract's codes."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        raise _client_error(uri, error) from None
    except S3UploadFailedError as error:
        raise _client_error(uri, error.__cause__ or error) from None
    except BotoCoreError as error:
        raise _transport_error(uri, error) from None


def head_object(uri: str, s3: S3Settings | None) -> dict[str, Any]:
    """boto3's HEAD answer for an object."""
    bucket, key = split_s3(uri)
    with s3_errors(uri):
        return dict(client(s3).head_object(Bucket=bucket, Key=key))


def list_objects(uri: str, s3: S3Settings | None = None) -> Iterator[tuple[str, int, str]]:
    """(relative path, size, ETag) of every object under an S3 prefix, paginated."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = client(s3).get_paginator("list_objects_v2")
    with s3_errors(uri):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = str(obj["Key"])[len(prefix) :]
                if rel and not rel.endswith("/"):
                    yield rel, int(obj["Size"]), str(obj["ETag"]).strip('"')
