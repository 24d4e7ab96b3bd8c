"""The URI grammar: which scheme a URI is, where a local one lives, how to join and split them.

A bare path or `file:///abs/path` is a local file; `pvc://CLAIM/path` is
`$KUBETRAIN_PVC_ROOT/CLAIM/path` (default `/mnt/pvc`), where the operator mounts the claim;
`s3://bucket/key` is an object; `hf://org/name[@revision]` a Hub repository (see `hub`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kubetrain_contract.layout import PVC_MOUNT_ROOT
from kubetrain_trainer.storage.errors import Refused, StorageError

PVC_ROOT_ENV = "KUBETRAIN_PVC_ROOT"
DEFAULT_PVC_ROOT = PVC_MOUNT_ROOT


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_hf(uri: str) -> bool:
    return uri.startswith("hf://")


def pvc_root() -> Path:
    """Where the operator mounts the run's claims."""
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def input_root(uri: str) -> Path:
    """The tree a local input must stay inside: its claim for `pvc://CLAIM/…`, else the
    directory it is named in (an input on one claim never reads another claim, or the pod)."""
    if uri.startswith("pvc://"):
        claim = uri[len("pvc://") :].split("/", 1)[0]
        return pvc_root() / claim
    return local_path(uri).parent


def redacted(uri: str) -> str:
    """The URI without userinfo and parameters (query, `;` parameters, fragment), for messages:
    a secret is never echoed."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    plain = re.split(r"[?;#]", path, maxsplit=1)[0]
    return f"{scheme}://{authority}{slash}{plain}" + ("…" if plain != path else "")


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
        return pvc_root() / uri[len("pvc://") :]
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
