"""`hf://datasets/ORG/NAME[@REVISION]`: revisions pinned to commits, only selected files fetched.

Real: huggingface_hub (HfApi.dataset_info, the tree listing, hf_hub_download, `HF_ENDPOINT` and
`HF_TOKEN`), pyarrow writing the Parquet files. Emulated: the Hub (tests/support/hub_standin.py),
serving a private dataset that needs the token and a public one.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub_standin import Hub, HubRepo, HubStandin
from kubetrain_contract.exit_codes import EXIT_INVALID
from kubetrain_trainer.storage import StorageError, hub_datasets

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
TOKEN = "hf_planted0123456789abcdefTOKEN"
PRIVATE = "kubetrain-test/policies"
PUBLIC = "kubetrain-test/tulu-mini"


def _parquet(texts: list[str]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), out)
    return out.getvalue()


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


#: The Hub's layouts side by side: a config folder, data/{split}-*, {split}/…, and files never read.
FILES = {
    "README.md": b"# policies\n",
    ".gitattributes": b"*.parquet filter=lfs\n",
    "loader.py": b"raise SystemExit('remote code must never run')\n",
    "default/train-00000-of-00002.parquet": _parquet(["a", "b"]),
    "default/train-00001-of-00002.parquet": _parquet(["c"]),
    "default/test-00000-of-00001.parquet": _parquet(["t"]),
    "other/train-00000-of-00001.parquet": _parquet(["o"]),
    "data/train-00000.jsonl": _jsonl(["j1", "j2"]),
    "data/validation.jsonl": _jsonl(["v"]),
    "extra/train/part-0.jsonl.gz": b"\x1f\x8b",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Hub]:
    """A private and a public dataset; HF_ENDPOINT and HF_TOKEN point at the stand-in."""
    hub = Hub(token=TOKEN)
    hub.add(HubRepo.of(PRIVATE, dict(FILES), TOKEN, kind="datasets"))
    hub.add(HubRepo.of(PUBLIC, {"data/train-0.parquet": _parquet(["p"])}, None, kind="datasets"))
    server = HubStandin(hub).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token stored on disk
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    server.stop()


def test_a_tag_and_a_branch_resolve_to_their_commits(hub: Hub) -> None:
    repo = hub.repos[("datasets", PRIVATE)]
    first = repo.commit
    repo.refs["v1.0"] = first
    assert hub_datasets.resolve_revision(f"hf://datasets/{PRIVATE}") == first
    assert hub_datasets.resolve_revision(f"hf://datasets/{PRIVATE}@v1.0") == first
    assert hub_datasets.resolve_revision(f"hf://datasets/{PRIVATE}@{first}") == first
    asked = [p for _, p, _ in hub.requests if p.startswith("/api/datasets/")]
    assert asked == [
        f"/api/datasets/{PRIVATE}/revision/main",
        f"/api/datasets/{PRIVATE}/revision/v1.0",
        f"/api/datasets/{PRIVATE}/revision/{first}",
    ]  # one API call each

    moved = repo.push({"data/train-00001.jsonl": _jsonl(["new"])}, "main", "more rows")
    assert moved != first and len(moved) == 40
    assert hub_datasets.resolve_revision(f"hf://datasets/{PRIVATE}@main") == moved
    assert hub_datasets.resolve_revision(f"hf://datasets/{PRIVATE}@v1.0") == first


@pytest.mark.parametrize(
    ("config", "split", "files", "expected"),
    [
        (
            "default",
            "train",
            [],
            ["default/train-00000-of-00002.parquet", "default/train-00001-of-00002.parquet"],
        ),
        ("default", "test", [], ["default/test-00000-of-00001.parquet"]),
        (
            None,
            "train",
            [],
            [
                "data/train-00000.jsonl",
                "default/train-00000-of-00002.parquet",
                "default/train-00001-of-00002.parquet",
                "extra/train/part-0.jsonl.gz",
                "other/train-00000-of-00001.parquet",
            ],
        ),
        (None, "validation", [], ["data/validation.jsonl"]),
        (None, None, ["data/*.jsonl"], ["data/train-00000.jsonl", "data/validation.jsonl"]),
        (None, "train", ["data/*"], ["data/train-00000.jsonl"]),
    ],
)
def test_only_the_selected_files_are_downloaded(
    hub: Hub,
    tmp_path: Path,
    config: str | None,
    split: str | None,
    files: list[str],
    expected: list[str],
) -> None:
    repo = hub.repos[("datasets", PRIVATE)]
    got = hub_datasets.fetch_dataset(
        f"hf://datasets/{PRIVATE}@main", tmp_path / "d", config=config, split=split, files=files
    )
    assert got.repo == PRIVATE and got.commit == repo.commit
    assert list(got.paths) == expected
    assert [f.read_bytes() for f in got.files] == [repo.files[p] for p in expected]
    assert [f.relative_to(tmp_path / "d").as_posix() for f in got.files] == expected
    fetched = sorted(
        p.removeprefix(f"/datasets/{PRIVATE}/resolve/{repo.commit}/") for p in hub.downloads()
    )
    assert fetched == expected  # nothing else (no README, no loader script), at the commit
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)


def test_a_rerun_downloads_nothing_again_and_a_moved_branch_reads_the_new_commit(
    hub: Hub, tmp_path: Path
) -> None:
    uri = f"hf://datasets/{PRIVATE}"
    first = hub_datasets.fetch_dataset(
        uri, tmp_path / "d", config=None, split=None, files=["data/*"]
    )
    count = len(hub.downloads())
    again = hub_datasets.fetch_dataset(
        uri, tmp_path / "d", config=None, split=None, files=["data/*"]
    )
    assert again == first and len(hub.downloads()) == count

    repo = hub.repos[("datasets", PRIVATE)]
    repo.push({"data/train-00001.jsonl": _jsonl(["new"])})
    moved = hub_datasets.fetch_dataset(
        uri, tmp_path / "e", config=None, split=None, files=["data/*"]
    )
    assert moved.commit == repo.commit != first.commit
    assert "data/train-00001.jsonl" in moved.paths


def test_a_public_dataset_needs_no_token(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    got = hub_datasets.fetch_dataset(
        f"hf://datasets/{PUBLIC}", tmp_path / "d", config=None, split="train", files=[]
    )
    assert got.paths == ("data/train-0.parquet",)
    assert pq.read_table(got.files[0]).column("text").to_pylist() == ["p"]


def _refusal(error: pytest.ExceptionInfo[StorageError]) -> str:
    assert error.value.code == EXIT_INVALID
    return str(error.value)


def test_the_private_dataset_without_the_token_names_the_secret(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    uri = f"hf://datasets/{PRIVATE}@main"
    with pytest.raises(StorageError) as error:
        hub_datasets.fetch_dataset(uri, tmp_path / "d", config=None, split=None, files=[])
    message = _refusal(error)
    assert message.startswith(f"{uri} (Hub at http://127.0.0.1:")
    assert "storage.hf.secretName" in message
    assert not hub.downloads()


def test_a_missing_dataset_or_revision_is_refused_naming_the_uri(hub: Hub, tmp_path: Path) -> None:
    for uri, expected in (
        ("hf://datasets/kubetrain-test/nothing", "no such repository, or it is private"),
        (f"hf://datasets/{PRIVATE}@no-such-branch", "no revision 'no-such-branch'"),
    ):
        with pytest.raises(StorageError) as error:
            hub_datasets.resolve_revision(uri)
        message = _refusal(error)
        assert message.startswith(uri) and expected in message


def test_no_matching_file_lists_what_the_repository_has(hub: Hub, tmp_path: Path) -> None:
    uri = f"hf://datasets/{PRIVATE}"
    with pytest.raises(StorageError) as error:
        hub_datasets.fetch_dataset(
            uri, tmp_path / "d", config="default", split="validation", files=[]
        )
    message = _refusal(error)
    commit = hub.repos[("datasets", PRIVATE)].commit
    assert message.startswith(f"{uri}: no Parquet or JSONL file at commit {commit} matches ")
    assert "config: default, split: validation" in message
    assert "data/train-00000.jsonl" in message and "loader.py" not in message
    assert "set config, split or files" in message
    assert not hub.downloads()


@pytest.mark.parametrize(
    "uri", ["hf://datasets/", "hf://datasets/org/../x", "hf://org/name", "s3://b/k"]
)
def test_a_malformed_uri_is_refused(uri: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as error:
        hub_datasets.resolve_revision(uri)
    assert "hf://datasets/ORG/NAME" in _refusal(error)


def test_a_hub_source_is_keyed_by_its_commit_and_a_moved_branch_is_a_new_dataset(
    hub: Hub, tmp_path: Path
) -> None:
    """Through the preprocess stage: the revision becomes a commit in the cache key and in the
    source's accounting; the same commit again is a cache hit; a moved branch is a cache miss."""
    from preprocess_support import config, run_stage, source

    texts = [f"policy number {i} says the same thing in other words." for i in range(60)]
    repo = hub.repos[("datasets", PUBLIC)]
    repo.push({"data/train-0.parquet": _parquet(texts)})
    uri = f"hf://datasets/{PUBLIC}@main"
    cfg = config(
        tmp_path,
        [],
        sources=[source("policies", uri, hub={"config": None, "split": "train", "files": []})],
        blockSize=16,
    )
    first = run_stage(cfg, tmp_path / "w1")
    [entry] = first["sources"]
    assert entry["commit"] == repo.commit and entry["rowsRead"] == len(texts)
    again = run_stage(cfg, tmp_path / "w2")
    assert (again["key"], again["cacheHit"]) == (first["key"], True)

    repo.push({"data/train-0.parquet": _parquet([*texts, "one more policy line, added later."])})
    moved = run_stage(cfg, tmp_path / "w3")
    assert moved["key"] != first["key"] and moved["cacheHit"] is False
    assert moved["sources"][0]["commit"] == repo.commit != entry["commit"]
    assert moved["sources"][0]["rowsRead"] == len(texts) + 1


def test_a_run_that_cannot_fit_fetches_no_hub_data(hub: Hub, tmp_path: Path) -> None:
    """The model's config.json is checked before the inputs are listed: a run that cannot fit
    (a full fine-tune of Llama-3.1-8B in fp32 on one 80 GiB GPU) downloads no Hub data."""
    from kubetrain_trainer.stage import InvalidInput
    from preprocess_support import config, run_stage, source
    from stage_base import base_config

    model = tmp_path / "llama-8b"
    model.mkdir()
    shutil.copy(MODELS / "llama-3.1-8b.json", model / "config.json")
    setup = {**base_config("train")["memory"]["setup"], "gpu": True, "weight_precision": "fp32"}
    request = {
        "gpuMemoryBytes": 80 * 1024**3,
        "gpuMemorySource": "resources.gpuMemory",
        "modelUri": str(model),
        "architecture": None,
        "setups": [setup],
    }
    terms = {"config": None, "split": None, "files": []}
    data = source("policies", f"hf://datasets/{PUBLIC}", hub=terms)
    cfg = config(tmp_path, [], sources=[data], fit=request)
    with pytest.raises(InvalidInput, match=r"spec.training: train on 1 process"):
        run_stage(cfg, tmp_path / "work")
    assert hub.downloads() == []
