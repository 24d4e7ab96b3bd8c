"""`hf://org/name[@revision]`: model and tokenizer directories from the Hugging Face Hub.

`huggingface_hub.snapshot_download` fetches the repository (or only the files matching the
patterns, e.g. a tokenizer's) into a directory of the stage's cache, so every rank of a node reads
one local copy. The token comes from `HF_TOKEN` (the operator sets it from the Secret named by
`storage.hf.secretName`, by `secretKeyRef`), the Hub's address from `HF_ENDPOINT` (a mirror or a
private Hub); neither is ever part of a URI or a config.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from kubetrain_trainer.storage.credentials import HF_CREDENTIALS_FIELD
from kubetrain_trainer.storage.errors import AccessDenied, NotFound, Refused, StorageError

#: `org/name` or `name`, as the Hub spells repository ids; a revision is a branch, tag or commit.
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
_REVISION = re.compile(r"^[\w./-]{1,200}$")


def parse(uri: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` → (`org/name`, `rev`); exit 2 for anything else."""
    body = uri.removeprefix("hf://").strip("/")
    repo, at, revision = body.partition("@")
    if not _REPO.match(repo) or ".." in repo or (at and not _REVISION.match(revision)):
        raise Refused(
            f"{uri}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION (a branch, tag or commit)"
        )
    return repo, revision or None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


@contextlib.contextmanager
def errors(uri: str, revision: str | None) -> Iterator[str]:
    """huggingface_hub's failures as storage errors naming `uri`, the Hub and the fix; yields the
    `where` every message starts with."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{uri} (Hub at {endpoint()})"
    try:
        yield where
    except RevisionNotFoundError:
        raise NotFound(
            f"{where}: no revision {revision!r} — name a branch, tag or commit"
        ) from None
    except GatedRepoError:
        raise AccessDenied(
            f"{where}: the repository is gated — accept its terms on the Hub with the account "
            f"whose token is in the Secret named by {HF_CREDENTIALS_FIELD} (key HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise NotFound(
            f"{where}: no such repository, or it is private — check the name, or set "
            f"{HF_CREDENTIALS_FIELD} to a Secret with an HF_TOKEN that may read it"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status in (401, 403):
            raise AccessDenied(
                f"{where}: access denied ({status}) — check the HF_TOKEN in the Secret named by "
                f"{HF_CREDENTIALS_FIELD}"
            ) from None
        raise StorageError(f"{where}: the Hub answered {status} — transient; retried") from None
    except (LocalEntryNotFoundError, OSError) as error:
        raise StorageError(
            f"{where}: cannot download ({type(error).__name__}) — transient network trouble, "
            "retried; check HF_ENDPOINT if it persists"
        ) from None


def download(uri: str, dest: Path, patterns: Sequence[str] | None = None) -> Path:
    """The repository's files (those matching `patterns`) in `dest`, fetched once per revision."""
    from huggingface_hub import snapshot_download

    repo, revision = parse(uri)
    with errors(uri, revision):
        path = snapshot_download(
            repo,
            revision=revision,
            local_dir=dest,
            allow_patterns=list(patterns) if patterns else None,
            endpoint=endpoint(),
            token=token(),
        )
    return Path(path)
