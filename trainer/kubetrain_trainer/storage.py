"""Every URI a stage reads or writes: local paths, `file://`, `pvc://CLAIM/path` and `s3://`.

One module so that the preprocess stage, the trainer and the merge stage agree on what a URI means:

* a bare path or `file:///abs/path` is a local file;
* `pvc://CLAIM/path` is `$KUBETRAIN_PVC_ROOT/CLAIM/path` (default `/mnt/pvc`), where the operator
  mounts the claim;
* `s3://bucket/key` goes through boto3 with the endpoint and region of `config.S3Settings`; the
  credentials come from the environment (`AWS_*` from a Secret, or IRSA), never from a config;
* `hf://org/name[@revision]` (models and tokenizers) is fetched with `huggingface_hub` into the
  stage's cache (`HF_TOKEN` and `HF_ENDPOINT` from the environment).

Inputs may be lists: `s3://bucket/prefix/` (every object under it), `s3://bucket/dir/*.jsonl` and
local globs expand to a sorted list (`expand`). URIs that carry credentials (userinfo, presigned or
token queries) are refused, and so are keys of a listing that would land outside their directory.

Errors are stage failures with the contract's exit codes: a missing object, a refused URI or
refused credentials exit 2 (retrying will not help); throttling, 5xx answers and broken
connections exit 1 (the operator retries with backoff).

Large objects move with boto3's transfer manager (multipart, retries, checksums). Its thresholds are
tuned with `KUBETRAIN_S3_MULTIPART_THRESHOLD` and `KUBETRAIN_S3_MULTIPART_CHUNKSIZE` (bytes); S3
refuses parts below 5 MiB. Local writes are atomic (temp file + fsync + rename); on S3 an object
appears whole or not at all, so "atomic" there means writing the marker object last.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import hashlib
import io
import ipaddress
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from kubetrain_trainer.config import AWS_S3, S3Settings
from kubetrain_trainer.stage import EXIT_INVALID, EXIT_RETRY, StageFailure

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
#: Attempts boto3 makes per request (adaptive retry mode); tests lower it.
MAX_ATTEMPTS_ENV = "KUBETRAIN_S3_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 10
#: Where credentials live instead of URIs (the run's fields, named in every refusal).
S3_CREDENTIALS_FIELD = "storage.s3.secretName"
HF_CREDENTIALS_FIELD = "storage.hf.secretName"
#: Query parameter names (lower case, substrings) that carry a credential: presigned S3 URLs
#: (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token), SAS and bearer tokens, API keys.
SECRET_QUERY_WORDS = ("signature", "credential", "token", "secret", "password", "sig", "key")
#: Instance metadata endpoints by name (their addresses are link-local or listed below).
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "instance-data"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("100.100.100.200")})  # Alibaba Cloud
_GLOB_CHARS = frozenset("*?[")


class StorageError(StageFailure):
    """A URI that cannot be read or written; the message names the URI and what to do.

    Retryable (exit 1) unless a subclass says otherwise: storage trouble is mostly transient.
    """

    code = EXIT_RETRY

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(self.code, message, details)


class NotFound(StorageError):
    """The object or file does not exist: the config names the wrong thing (exit 2)."""

    code = EXIT_INVALID


class Refused(StorageError):
    """A URI, key or endpoint that must not be used (credentials, a path escape): exit 2."""

    code = EXIT_INVALID


class AccessDenied(StorageError):
    """Missing or wrong credentials: retrying with the same Secret will not help (exit 2)."""

    code = EXIT_INVALID


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_hf(uri: str) -> bool:
    return uri.startswith("hf://")


def redacted(uri: str) -> str:
    """The URI without userinfo and query, for messages: a secret is never echoed."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{path.split('?', 1)[0]}" + ("?…" if "?" in path else "")


def credential_problem(uri: str) -> str | None:
    """What credential a URI carries (userinfo, a presigned or token query), or None."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return None
    authority, slash, _ = rest.partition("/")
    # hf://name@revision has "@" in its first segment too; userinfo is followed by a path.
    if "@" in authority and (scheme != "hf" or slash):
        return "user information (NAME:SECRET@)"
    query = urlsplit(uri).query
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if any(word in name.lower() for word in SECRET_QUERY_WORDS):
            return f"a credential in its query ({name}=…)"
    return None


def refuse_credentials(uri: str, field: str) -> None:
    """Exit 2 for a URI that carries a credential; the message never repeats the secret."""
    problem = credential_problem(uri)
    if problem is None:
        return
    secret = HF_CREDENTIALS_FIELD if is_hf(uri) else S3_CREDENTIALS_FIELD
    raise Refused(
        f"{field}: {redacted(uri)} carries {problem} — credentials never go in URIs (they "
        f"would end up in logs, status and events): put them in a Secret and use {secret}, "
        "then write the plain URI"
    )


def endpoint_problem(s3: S3Settings) -> str | None:
    """Why `s3.endpoint` must not be used, or None (empty: AWS's own endpoints)."""
    if not s3.endpoint:
        return None
    parts = urlsplit(s3.endpoint)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "expected https://HOST[:PORT]"
    if credential_problem(s3.endpoint):
        return f"it carries credentials — use {S3_CREDENTIALS_FIELD}"
    host = parts.hostname.lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host in METADATA_HOSTS or (
        address is not None and (address.is_link_local or address in METADATA_ADDRESSES)
    ):
        return (
            f"{host} is a link-local or instance-metadata address, never an object store "
            "(requests there can read the node's cloud credentials)"
        )
    if parts.scheme == "http" and not s3.allow_insecure_endpoint:
        return (
            "plain http:// sends data and request signatures unencrypted — use https://, or "
            "set storage.s3.allowInsecureEndpoint: true for a store you trust on this network"
        )
    return None


def refuse_endpoint(s3: S3Settings) -> None:
    problem = endpoint_problem(s3)
    if problem is not None:
        raise Refused(f"s3.endpoint: {redacted(s3.endpoint)}: {problem}")


def check_config(config: Any) -> None:
    """Refuse credential URIs anywhere in a stage config, and unsafe S3 endpoints (exit 2)."""
    refuse_endpoint(config.s3)

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and "://" in value:
            refuse_credentials(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")

    walk(config.model_dump(by_alias=True, exclude={"s3"}), "")


def contained(dest: Path, rel: str, where: str) -> Path:
    """`dest/rel` for a relative path from a listing or manifest, refusing every escape.

    Absolute paths, empty, `.` and `..` components and backslashes are refused (exit 2) naming
    the key, and so is a path that resolves outside `dest` through a symlink already there.
    """
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise Refused(
            f"{where}: key {rel!r} would be written outside {dest} (absolute, empty, '.' or "
            "'..' components) — nothing was written; rename or delete that object"
        )
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise Refused(
            f"{where}: key {rel!r} resolves outside {dest} (through a symlink) — nothing was "
            "written; remove the symlink"
        )
    return target


def _glob_match(key: str, pattern: str) -> bool:
    """Shell-like: `*` and `?` never cross a `/` (same number of segments, each fnmatch-ed)."""
    keys, patterns = key.split("/"), pattern.split("/")
    return len(keys) == len(patterns) and all(
        fnmatch.fnmatchcase(k, p) for k, p in zip(keys, patterns, strict=True)
    )


def _has_glob(text: str) -> bool:
    return any(char in _GLOB_CHARS for char in text)


def expand(uri: str, field: str, s3: S3Settings | None = None) -> list[str]:
    """One input URI → the files it names, sorted: itself, every object under `s3://b/p/` (or
    local `dir/`), or every match of a glob (`*`, `?`, `[…]`; never across `/`). Nothing found
    is exit 2 naming the field."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key.endswith("/") and not _has_glob(key):
            return [uri]
        static = key[: min((key.index(c) for c in _GLOB_CHARS if c in key), default=len(key))]
        prefix = static.rpartition("/")[0]
        base = f"s3://{bucket}/{prefix}".rstrip("/") if prefix else f"s3://{bucket}"
        found = [
            join(base, rel)
            for rel, _, _ in list_objects(base, s3)
            if (key.endswith("/") and not _has_glob(key))
            or _glob_match(f"{prefix}/{rel}" if prefix else rel, key)
        ]
    elif _has_glob(uri) or uri.endswith("/"):
        path = str(local_path(uri))
        if _has_glob(path):
            matches = [Path(p) for p in glob.glob(path) if Path(p).is_file()]
        else:
            matches = [p for p in Path(path).rglob("*") if p.is_file()]
        found = [_local_uri(uri, p) for p in matches]
    else:
        return [uri]
    if not found:
        raise NotFound(
            f"{field}: {uri} matches no file — check the prefix or pattern (`*` does not cross "
            "'/'; a prefix must end with '/')"
        )
    return sorted(found)


def _local_uri(uri: str, path: Path) -> str:
    """A file found under a local, `file://` or `pvc://` pattern, in the pattern's scheme."""
    if uri.startswith("pvc://"):
        root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return "pvc://" + path.relative_to(root).as_posix()
    return str(path)


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
        raise Refused(
            f"{redacted(uri)}: {scheme}:// cannot be read here — use s3://, pvc://, file:// or a "
            "local path (hf:// names a model or tokenizer directory, not a file)"
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
def _s3_errors(uri: str) -> Iterator[None]:
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


def _head(uri: str, s3: S3Settings | None) -> dict[str, Any]:
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        return dict(client(s3).head_object(Bucket=bucket, Key=key))


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
        raise Refused(f"{uri}: is a directory — name the files, or end it with '/'") from None
    except PermissionError:
        raise Refused(_unreadable(uri)) from None


def _unreadable(uri: str) -> str:
    return (
        f"{uri}: permission denied — the stage runs as a non-root user: make the file readable "
        "by it (chmod a+r, or fsGroup on the volume)"
    )


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
        extra: dict[str, str] = {}
        if self.pos:
            extra = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag}
        with _s3_errors(self.uri):
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
        raise Refused(_unreadable(uri)) from None


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
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            client(s3).put_object(Bucket=bucket, Key=key, Body=data)
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
        bucket, key = split_s3(uri)
        extra = {"Metadata": dict(metadata)} if metadata else None
        with _s3_errors(uri):
            client(s3).upload_file(
                str(path), bucket, key, ExtraArgs=extra, Config=transfer_config()
            )
        return
    with path.open("rb") as src:
        _atomic_local(local_path(uri), lambda f: shutil.copyfileobj(src, f, 1 << 20))


def download_file(uri: str, path: Path, s3: S3Settings | None = None) -> None:
    """Copy one object or file to a local path (multipart ranged GETs on S3; atomic)."""
    if not is_s3(uri):
        try:
            upload_file(local_path(uri), str(path))
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        except PermissionError:
            raise Refused(_unreadable(uri)) from None
        return
    bucket, key = split_s3(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: processes of two nodes may share this directory on a PVC.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        with _s3_errors(uri):
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
    with _s3_errors(uri):
        client(s3).delete_object(Bucket=bucket, Key=key)


def list_objects(uri: str, s3: S3Settings | None = None) -> Iterator[tuple[str, int, str]]:
    """(relative path, size, ETag) of every object under an S3 prefix, paginated."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = client(s3).get_paginator("list_objects_v2")
    with _s3_errors(uri):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = str(obj["Key"])[len(prefix) :]
                if rel and not rel.endswith("/"):
                    yield rel, int(obj["Size"]), str(obj["ETag"]).strip('"')


def download_dir(
    uri: str, dest: Path, s3: S3Settings | None = None, patterns: Sequence[str] | None = None
) -> Path:
    """A local directory with the tree at uri: local trees as they are, S3 prefixes fetched once.

    An S3 prefix is copied into `dest`; files already there with the same size and ETag (recorded
    in `dest/.kubetrain-download.json`) are not fetched again. `patterns` (fnmatch on the relative
    path) limits what is fetched, e.g. only the tokenizer files of a model directory. Every key
    is checked before anything is fetched: one that would land outside `dest` refuses the whole
    prefix (exit 2). `hf://` repositories are fetched by `huggingface_hub` into `dest`.
    """
    if is_hf(uri):
        from kubetrain_trainer import hub

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
    targets = [contained(dest, rel, uri) for rel, _, _ in wanted]
    for (rel, nbytes, etag), target in zip(wanted, targets, strict=True):
        if state.get(rel) == [nbytes, etag] and target.exists() and target.stat().st_size == nbytes:
            continue
        download_file(join(uri, rel), target, s3)
        state[rel] = [nbytes, etag]
        write_text(str(state_path), json.dumps(state, sort_keys=True))
    log.info("%s: %d files in %s", uri, len(wanted), dest)
    return dest
