"""`hf://org/name[@revision]` models and tokenizers, through huggingface_hub.

Real: `huggingface_hub.snapshot_download` (its HTTP client, revision resolution, tree listing,
file downloads, `HF_ENDPOINT` and `HF_TOKEN` handling), the preprocess and train stages in this
process, the tiny base model the trainer tests build. Emulated: the Hub itself
(tests/support/hub_standin.py), serving a private repository that needs the bearer token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub_standin import Hub, HubRepo, HubStandin
from kubetrain_contract.exit_codes import EXIT_INVALID
from kubetrain_trainer import train
from kubetrain_trainer.__main__ import main
from preprocess_support import config, docs, run_stage, write_jsonl
from trainer_support import Assets, train_config

REPO = "kubetrain-test/tiny-llama"
TOKEN = "hf_planted0123456789abcdefTOKEN"
COMMIT = hashlib.sha1(b"kubetrain-test").hexdigest()


@pytest.fixture
def hub(assets: Assets, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """The tiny base model as a private Hub repository; HF_ENDPOINT and HF_TOKEN point at it."""
    base = assets.base_model()
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file() and p.name != "COMPLETE"}
    repo = HubRepo(name=REPO, commits={COMMIT: files}, refs={"main": COMMIT}, token=TOKEN)
    server = HubStandin(Hub(repos={("models", REPO): repo}, token=TOKEN)).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server.hub
    server.stop()


def _texts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in docs()[:300]])


def test_a_hub_tokenizer_and_model_are_fetched_into_the_stage_cache(
    hub: Hub, assets: Assets, tmp_path: Path
) -> None:
    cfg = config(tmp_path, [str(_texts(tmp_path))], tokenizer={"uri": f"hf://{REPO}@main"})
    result = run_stage(cfg, tmp_path / "pre")
    assert result["trainRows"] > 0
    fetched = list((tmp_path / "pre" / ".kubetrain-cache" / "tokenizers").iterdir())
    assert len(fetched) == 1 and (fetched[0] / "tokenizer.json").is_file()
    assert not (fetched[0] / "model.safetensors").exists()  # only the tokenizer's files
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)

    config_ = train_config(
        cfg["datasetPointer"],
        tmp_path / "out",
        method="sft",
        model={"uri": f"hf://{REPO}"},
        training={"maxSteps": 3},
    )
    outcome = train.run(config_, tmp_path / "work")
    assert outcome["step"] == 3
    models = list((tmp_path / "work" / "models").iterdir())
    assert len(models) == 1
    assert (models[0] / "model.safetensors").read_bytes() == hub.repos[("models", REPO)].files[
        "model.safetensors"
    ]
    downloads = [p for method, p, _ in hub.requests if method == "GET" and "/resolve/" in p]
    assert f"/{REPO}/resolve/{COMMIT}/model.safetensors" in downloads


def test_without_the_token_the_error_names_the_secret_field(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token stored on disk either
    cfg = config(tmp_path, [str(_texts(tmp_path))], tokenizer={"uri": f"hf://{REPO}"})
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(cfg))
    assert main(["preprocess", "--config", str(path), "--workdir", str(tmp_path / "w")]) == (
        EXIT_INVALID
    )
    error = json.loads((tmp_path / "w" / "result-preprocess.json").read_text())["error"]
    assert error.startswith(f"tokenizer.uri: hf://{REPO} (Hub at http://127.0.0.1:")
    assert "storage.hf.secretName" in error and TOKEN not in error


def test_the_fit_check_fetches_only_config_json_from_the_hub(hub: Hub, tmp_path: Path) -> None:
    from kubetrain_contract import memory
    from stage_base import base_config

    planned = {**base_config("train")["memory"]["setup"], "gpu": True}
    request = {
        "gpuMemoryBytes": 1024**3 // 1024,  # 1 MiB: even the tiny model cannot fit
        "gpuMemorySource": "resources.gpuMemory",
        "modelUri": f"hf://{REPO}@main",
        "architecture": None,
        "setups": [planned],
    }
    cfg = config(tmp_path, [str(_texts(tmp_path))], fit=request)
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(cfg))
    assert main(["preprocess", "--config", str(path), "--workdir", str(tmp_path / "w")]) == (
        EXIT_INVALID
    )
    result = json.loads((tmp_path / "w" / "result-preprocess.json").read_text())
    shape = memory.ModelShape.from_hf_config(
        json.loads(hub.repos[("models", REPO)].files["config.json"])
    )
    estimate = memory.estimate(shape, memory.Setup.from_dict(planned))
    assert result["error"].startswith(
        "spec.training: " + memory.refusal(estimate, shape, 1024**2, "resources.gpuMemory")
    )
    downloads = {p for method, p, _ in hub.requests if method == "GET" and "/resolve/" in p}
    assert f"/{REPO}/resolve/{COMMIT}/config.json" in downloads
    assert not [p for p in downloads if p.endswith(".safetensors")]
    assert not (tmp_path / "out" / "dataset.json").exists()
