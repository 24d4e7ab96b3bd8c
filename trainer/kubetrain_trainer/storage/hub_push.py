"""output.push: a model directory and its model card to a Hub model repository, in one commit.

The repository is created when missing (private unless told otherwise; an existing one keeps its
visibility), the branch too; every file of the directory but kubetrain's markers, and the card as
README.md, go in ONE commit (huggingface_hub's `create_commit`), so the repository never shows
half a model. Transient failures (HTTP 429 and 5xx, broken connections) are retried with backoff;
refusals (a token that may not write) are not. The token is `HF_TOKEN`, the Hub `HF_ENDPOINT`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetrain_contract.exit_codes import EXIT_RETRY
from kubetrain_trainer.storage import hub
from kubetrain_trainer.storage.errors import StorageError

log = logging.getLogger(__name__)

#: Seconds before each retry of a push; after the last, the stage fails with exit 1 (retried).
RETRY_DELAYS = (1.0, 4.0, 15.0)


@dataclass(frozen=True)
class Upload:
    """What one push sends: a directory (files for which `skip` is false) and the card."""

    folder: Path
    card: str
    repo: str
    private: bool
    revision: str
    message: str
    skip: Callable[[Path], bool]


def push(upload: Upload) -> str:
    """Upload the directory and the card as README.md in one commit; the commit sha."""
    uri = f"hf://{upload.repo}@{upload.revision}"
    for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
        time.sleep(delay)
        try:
            with hub.errors(uri, upload.revision):
                return _commit(upload)
        except StorageError as error:
            if error.code != EXIT_RETRY or attempt == len(RETRY_DELAYS):
                raise
            log.warning("push to %s: attempt %d failed: %s", uri, attempt + 1, error.message)
    raise AssertionError("unreachable")


def _commit(upload: Upload) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint(), token=hub.token())
    api.create_repo(upload.repo, private=upload.private, exist_ok=True, repo_type="model")
    if upload.revision != "main":
        api.create_branch(upload.repo, branch=upload.revision, exist_ok=True, repo_type="model")
    files = sorted(p for p in upload.folder.rglob("*") if p.is_file() and not upload.skip(p))
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(upload.folder).as_posix(), path_or_fileobj=p)
        for p in files
        if p.relative_to(upload.folder).as_posix() != "README.md"
    ]
    operations.append(
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=upload.card.encode())
    )
    info = api.create_commit(
        upload.repo,
        operations,
        commit_message=upload.message,
        revision=upload.revision,
        repo_type="model",
    )
    if info.oid is None:
        raise StorageError(
            f"hf://{upload.repo}@{upload.revision}: the Hub named no commit for the push; retried"
        )
    return info.oid
