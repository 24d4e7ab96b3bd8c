"""Input lists: one URI that names many files — a prefix ending in `/` or a glob — expanded.

Globs are shell-like: `*`, `?` and `[…]` never cross a `/`, locally and on S3 alike, and the
result is sorted so that every stage and every retry sees the same order. Every local file named
or found must be a regular file inside the pattern's directory (its claim for `pvc://`): a match
that is a symlink out of it, a FIFO, a device or a directory is refused (exit 2) naming it.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path

from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.storage.errors import NotFound
from kubetrain_trainer.storage.readers import check_local_input
from kubetrain_trainer.storage.s3 import list_objects
from kubetrain_trainer.storage.uris import (
    input_root,
    is_s3,
    join,
    local_path,
    pvc_root,
    split_s3,
)

_GLOB_CHARS = frozenset("*?[")


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
    is exit 2 naming the field, and so is a local file that is not a regular file inside its
    tree (`readers.check_local_input`)."""
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
            matches = [Path(p) for p in glob.glob(path)]
        else:  # the directories of a prefix are walked, not read
            matches = [p for p in Path(path).rglob("*") if p.is_symlink() or not p.is_dir()]
        found = [_local_uri(uri, p) for p in matches]
        root = _pattern_root(uri)
        for match in found:
            check_local_input(match, root)
    else:
        local = "://" not in uri or uri.startswith(("file://", "pvc://"))
        if local and os.path.lexists(local_path(uri)):
            check_local_input(uri)
        return [uri]
    if not found:
        raise NotFound(
            f"{field}: {uri} matches no file — check the prefix or pattern (`*` does not cross "
            "'/'; a prefix must end with '/')"
        )
    return sorted(found)


def _pattern_root(uri: str) -> Path:
    """The tree a local pattern's matches must stay in: the claim, or the pattern's directory."""
    if uri.startswith("pvc://"):
        return input_root(uri)
    path = str(local_path(uri))
    static = path[: min((path.index(c) for c in _GLOB_CHARS if c in path), default=len(path))]
    directory = static.rpartition("/")[0]
    return Path(directory or ("/" if static.startswith("/") else "."))


def _local_uri(uri: str, path: Path) -> str:
    """A file found under a local, `file://` or `pvc://` pattern, in the pattern's scheme."""
    if uri.startswith("pvc://"):
        return "pvc://" + path.relative_to(pvc_root()).as_posix()
    return str(path)
