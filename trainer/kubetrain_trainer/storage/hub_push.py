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
from pathlib import Path

from kubetrain_contract.exit_codes import EXIT_RETRY
from kubetrain_trainer.storage import hub
from kubetrain_trainer.storage.errors import StorageError

log = logging.getLogger(__name__)

#: Seconds before each retry of a push; after the last, the stage fails with exit 1 (retried).
RETRY_DELAYS = (1.0, 4.0, 15.0)


def push(
    folder: Path,
    card: str,
    *,
    repo: str,
    private: bool,
    revision: str,
    message: str,
    skip: Callable[[Path], bool],
) -> str:
    """Upload `folder` (files for which `skip` is false) and `card` as README.md; the commit sha."""
    uri = f"hf://{repo}@{revision}"
    for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
        time.sleep(delay)
        try:
            with hub.errors(uri, revision):
                return _commit(folder, card, repo, private, revision, message, skip)
        except StorageError as error:
            if error.code != EXIT_RETRY or attempt == len(RETRY_DELAYS):
                raise
            log.warning("push to %s: attempt %d failed: %s", uri, attempt + 1, error.message)
    raise AssertionError("unreachable")


def _commit(
    folder: Path,
    card: str,
    repo: str,
    private: bool,
    revision: str,
    message: str,
    skip: Callable[[Path], bool],
) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint(), token=hub.token())
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    if revision != "main":
        api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not skip(p))
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p)
        for p in files
        if p.relative_to(folder).as_posix() != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    info = api.create_commit(
        repo, operations, commit_message=message, revision=revision, repo_type="model"
    )
    if info.oid is None:
        raise StorageError(f"hf://{repo}@{revision}: the Hub named no commit for the push; retried")
    return info.oid
