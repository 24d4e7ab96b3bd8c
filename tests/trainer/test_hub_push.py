"""output.push: the merge stage uploads the merged model and its card to the Hub in one commit.

Real: the train stage producing a LoRA adapter, the merge stage (merge, evaluation, export) in
this process and its entry point's exit code, huggingface_hub's create_repo/create_commit (its
preupload, validate-yaml and NDJSON commit requests). Emulated: the Hub
(tests/support/hub_standin.py), which refuses the first writes when told to.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hub_standin import Hub, HubStandin
from kubetrain_contract.exit_codes import EXIT_RETRY
from kubetrain_trainer import checkpoint, merge, train
from kubetrain_trainer.__main__ import main
from kubetrain_trainer.storage import hub_push
from trainer_support import Assets, merge_config, train_config, write_config

TOKEN = "hf_planted0123456789abcdefTOKEN"
REPO = "kubetrain-test/pushed"
PUSH = {"repo": REPO, "private": True, "revision": "main"}


@pytest.fixture(scope="module")
def trained(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose LoRA adapter is trained (6 steps), merged by no one yet."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("push-run")
    config = train_config(
        assets.chat(),
        root / "out",
        method="sft",
        model={"uri": str(assets.base_model())},
        adapter={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        training={"maxSteps": 6, "learningRate": 2e-2},
    )
    train.run(config, root / "work")
    return root / "out"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    hub = Hub(token=TOKEN)
    server = HubStandin(hub).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    server.stop()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_push_refused_once_is_retried_and_lands_in_one_commit(
    assets: Assets, trained: Path, hub: Hub, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    hub.fail = [429]  # the Hub throttles the first write
    config = merge_config(assets.chat(), str(assets.base_model()), out, push=PUSH)
    result = merge.run(config, tmp_path / "work")

    repo = hub.repos[("models", REPO)]
    assert result["hubRepo"] == REPO and result["hubCommit"] == repo.commit
    assert not hub.fail and len(repo.commits) == 1  # retried, then one commit
    assert repo.messages[repo.commit] == f"kubetrain: {config.run} step 6"
    merged = out / "merged"
    local = {
        p.relative_to(merged).as_posix(): _sha256(p.read_bytes())
        for p in merged.rglob("*")
        if p.is_file() and not checkpoint.is_bookkeeping(merged, p)
    }
    assert "model.safetensors" in local and "COMPLETE" not in local
    pushed = {name: _sha256(data) for name, data in repo.files.items()}
    assert pushed == {**local, "README.md": _sha256((out / "README.md").read_bytes())}
    assert b"validation perplexity" in repo.files["README.md"]
    writes = [p for method, p, _ in hub.requests if method == "POST"]
    assert writes.count("/api/repos/create") == 2  # the refused one and its retry
    assert writes[-1] == f"/api/models/{REPO}/commit/main"


def test_a_failed_push_exits_1_and_the_rerun_only_pushes(
    assets: Assets, trained: Path, hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    monkeypatch.setattr(hub_push, "RETRY_DELAYS", (0.0, 0.0))
    hub.fail = [500, 503, 500]  # every attempt of the first run
    config = merge_config(assets.chat(), str(assets.base_model()), out, push=PUSH)
    path = write_config(tmp_path / "merge.json", config)
    argv = ["merge", "--config", str(path), "--workdir", str(tmp_path / "work")]
    assert main(argv) == EXIT_RETRY
    error = json.loads((tmp_path / "work" / "result-merge.json").read_text())["error"]
    assert error.startswith(f"hf://{REPO}@main (Hub at http://127.0.0.1:")
    assert "answered 500" in error and ("models", REPO) not in hub.repos

    evaluated = {
        name: (out / name).stat().st_mtime_ns
        for name in ("merged/COMPLETE", "merged/model.safetensors", "metrics.json", "README.md")
    }
    evaluation = json.loads((out / merge.EVALUATION).read_text())["result"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "work" / "result-merge.json").read_text())
    repo = hub.repos[("models", REPO)]
    assert result["hubCommit"] == repo.commit and result["hubRepo"] == REPO
    assert result["perplexity"] == evaluation["perplexity"]  # the first run's evaluation
    # Neither merged nor evaluated again: its outputs are the first run's files.
    assert {name: (out / name).stat().st_mtime_ns for name in evaluated} == evaluated
    assert repo.files["model.safetensors"] == (out / "merged" / "model.safetensors").read_bytes()
