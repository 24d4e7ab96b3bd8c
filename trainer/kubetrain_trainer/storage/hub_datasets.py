"""`hf://datasets/ORG/NAME[@REVISION]`: a Hub dataset's Parquet and JSONL files, pinned by commit.

The revision (a branch or tag; `main` when none) is resolved to its commit sha with one API call
(`resolve_revision`, what the cache key pins: a moved branch is a new key); the files are then
listed and downloaded at that commit, never at the moving name, so the rows read are the rows
keyed. Only data files are read — `*.parquet`, `*.jsonl`, `*.ndjson`, `*.json` (the last three
also `.gz` or `.zst`): no `datasets` loading scripts, no remote code.

Which files, given the source's `config`, `split` and `files` (a file is read when it matches
every term that is set; none set: every data file of the repository):

* `config` — the file lies in the folder of that name (the Hub's Parquet layout,
  `{config}/{split}-*.parquet`, `{config}/{split}/*.parquet`);
* `split` — a folder of the path is named as the split (`{split}/…`, `data/{split}/…`), or the
  file's name is the split followed by `-`, `_`, `.` or a digit
  (`data/{split}-00000-of-00002.parquet`, `{split}.jsonl`, `train_0.jsonl`);
* `files` — fnmatch globs on the repository path (`data/*.parquet`).

The token is `HF_TOKEN` (the operator sets it from `storage.hf.secretName`), the Hub `HF_ENDPOINT`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kubetrain_trainer.storage import hub
from kubetrain_trainer.storage.errors import NotFound, Refused

PREFIX = "hf://datasets/"
#: Data file names the preprocess stage reads; anything else in a repository is never fetched.
_DATA = re.compile(r"\.(parquet|(jsonl|ndjson|json)(\.gz|\.zst)?)$", re.IGNORECASE)
#: How many of a repository's data files an error lists, to show what could be selected.
_SHOWN = 8


@dataclass(frozen=True)
class HubDataset:
    repo: str
    """ORG/NAME."""
    commit: str
    """The revision resolved to a commit sha (40 hex)."""
    files: tuple[Path, ...]
    """Local copies of the selected Parquet/JSONL files, in repository path order."""
    paths: tuple[str, ...]
    """Their repository paths (same order), for accounting and the manifest."""


def is_dataset(uri: str) -> bool:
    return uri.startswith(PREFIX)


def parse(uri: str) -> tuple[str, str]:
    """`hf://datasets/org/name@rev` → (`org/name`, `rev`; `main` when none); exit 2 otherwise."""
    try:
        if not is_dataset(uri):
            raise Refused(uri)
        repo, revision = hub.parse("hf://" + uri.removeprefix(PREFIX))
    except Refused:
        raise Refused(
            f"{uri}: expected hf://datasets/ORG/NAME or hf://datasets/ORG/NAME@REVISION "
            "(a branch, tag or commit)"
        ) from None
    return repo, revision or "main"


def resolve_revision(uri: str) -> str:
    """The commit sha the URI's revision names now (one API call)."""
    from huggingface_hub import HfApi

    repo, revision = parse(uri)
    with hub.errors(uri, revision):
        info = HfApi(endpoint=hub.endpoint()).dataset_info(
            repo, revision=revision, token=hub.token()
        )
    if info.sha is None:
        raise NotFound(
            f"{uri}: the Hub named no commit for revision {revision!r} — name a branch, tag or "
            "commit"
        )
    return info.sha


def fetch_dataset(
    uri: str, dest: Path, *, config: str | None, split: str | None, files: Sequence[str]
) -> HubDataset:
    """The selected files at the revision's commit, downloaded into `dest` (a rerun finds them
    there and downloads nothing again)."""
    from huggingface_hub import hf_hub_download

    repo, revision = parse(uri)
    commit = resolve_revision(uri)
    data = sorted(n for n in _listing(uri, repo, revision, commit) if _DATA.search(n))
    chosen = [n for n in data if selected(n, config=config, split=split, files=files)]
    if not chosen:
        terms = ", ".join(
            f"{k}: {v}"
            for k, v in (("config", config), ("split", split), ("files", list(files)))
            if v
        )
        shown = ", ".join(data[:_SHOWN]) + (
            f" … ({len(data)} in all)" if len(data) > _SHOWN else ""
        )
        raise NotFound(
            f"{uri}: no Parquet or JSONL file at commit {commit} matches "
            f"{terms or 'the source'} — the repository's data files: {shown or 'none'}; set "
            "config, split or files to name some of them"
        )
    dest.mkdir(parents=True, exist_ok=True)
    local = []
    with hub.errors(uri, revision):
        for name in chosen:
            path = hf_hub_download(
                repo,
                name,
                repo_type="dataset",
                revision=commit,
                local_dir=dest,
                endpoint=hub.endpoint(),
                token=hub.token(),
            )
            local.append(Path(str(path)))
    return HubDataset(repo=repo, commit=commit, files=tuple(local), paths=tuple(chosen))


def selected(path: str, *, config: str | None, split: str | None, files: Sequence[str]) -> bool:
    """Whether a repository path is read under the source's terms (the module's rules)."""
    parts = PurePosixPath(path).parts
    if config is not None:
        if len(parts) < 2 or parts[0] != config:
            return False
        parts = parts[1:]
    if split is not None:
        name_matches = re.match(rf"{re.escape(split)}([-_.0-9]|$)", parts[-1]) is not None
        if split not in parts[:-1] and not name_matches:
            return False
    return not files or any(fnmatch.fnmatchcase(path, glob) for glob in files)


def _listing(uri: str, repo: str, revision: str, commit: str) -> list[str]:
    """Every file path of the repository at `commit` (the tree API, recursive, paged)."""
    from huggingface_hub import HfApi

    with hub.errors(uri, revision):
        return HfApi(endpoint=hub.endpoint()).list_repo_files(
            repo, repo_type="dataset", revision=commit, token=hub.token()
        )
