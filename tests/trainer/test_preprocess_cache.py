"""The content-addressed cache: what changes the key (and what must not), hits, corrupt shards.

Real: input files and tokenizer directories on disk with their bytes hashed, the stage run twice
against the same cache root, a shard corrupted on disk and the verification that catches it.
Emulated: nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetrain_trainer.metrics import PreprocessMetrics
from kubetrain_trainer.preprocess import dataset, pipeline
from preprocess_support import (
    config,
    conversations,
    docs,
    file_hashes,
    parse,
    plain_sources,
    run_stage,
    tokenizer_dir,
    write_jsonl,
)
from stage_base import changed


def key(cfg: dict[str, Any], tmp: Path) -> str:
    return pipeline.locate(parse(cfg), tmp / "work").key


def test_the_key_follows_the_content_and_nothing_else(tmp_path: Path) -> None:
    rows = [{"text": t, "body": t[::-1]} for t in docs(20_000)]
    source = write_jsonl(tmp_path / "a.jsonl", rows)
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir(), tok)
    base = config(tmp_path, [str(source)], tokenizer={"uri": str(tok)})
    reference = key(base, tmp_path)

    renamed = tmp_path / "elsewhere" / "b.jsonl"
    renamed.parent.mkdir()
    shutil.copy(source, renamed)
    same = {
        "workers": changed(base, {"workers": 2}),
        "run name": changed(base, {"run": "another-run"}),
        "metrics port": changed(base, {"metricsPort": 9400}),
        "rejection limit": changed(base, {"maxRejectedFraction": 0.3}),
        "cache root": changed(base, {"cacheRoot": str(tmp_path / "other-cache")}),
        "pointer": changed(base, {"datasetPointer": str(tmp_path / "p.json")}),
        "file name and place": changed(base, {"sources": plain_sources([str(renamed)])}),
        "other formats' fields": changed(base, {"fields": {"messages": "conversation"}}),
        "textSplit without .txt": changed(base, {"textSplit": "line"}),
        "seed without holdout": changed(base, {"seed": 7}),
        "s3 endpoint": changed(base, {"s3": {"endpoint": "http://127.0.0.1:1"}}),
    }
    for what, cfg in same.items():
        assert key(cfg, tmp_path) == reference, f"{what} must not change the key"

    flipped = tmp_path / "flipped.jsonl"
    data = bytearray(source.read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    flipped.write_bytes(bytes(data))
    other_tok = tmp_path / "tok2"
    shutil.copytree(tok, other_tok)
    tok_config = json.loads((other_tok / "tokenizer_config.json").read_text())
    (other_tok / "tokenizer_config.json").write_text(json.dumps({**tok_config, "x": 1}))
    train = {"vocabSize": 600, "specialTokens": ["<|endoftext|>"]}
    different = {
        "one input byte": changed(base, {"sources": plain_sources([str(flipped)])}),
        "a tokenizer file": changed(base, {"tokenizer": {"uri": str(other_tok)}}),
        "field name": changed(base, {"fields": {"text": "body"}}),
        "block size": changed(base, {"blockSize": 128}),
        "partial block": changed(base, {"partialBlock": "drop"}),
        "holdout fraction": changed(base, {"validationFraction": 0.1}),
        "validation files": changed(
            base, {"sources": plain_sources([str(source)], [str(renamed)])}
        ),
        "an added input": changed(base, {"sources": plain_sources([str(source), str(renamed)])}),
        "tokenizer recipe": changed(base, {"tokenizer": {"train": train}}),
        "tokenizer vocabulary": changed(
            base, {"tokenizer": {"train": {**train, "vocabSize": 601}}}
        ),
    }
    keys = {what: key(cfg, tmp_path) for what, cfg in different.items()}
    keys["seed with holdout"] = key(changed(base, {"validationFraction": 0.1, "seed": 7}), tmp_path)
    for what, value in keys.items():
        assert value != reference, f"{what} must change the key"
    assert len(set(keys.values())) == len(keys), "every change gives its own key"


def test_chat_keys_follow_the_template_and_the_field(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", conversations(5))
    base = config(tmp_path, [str(source)], format="chat", chatTemplate="chatml")
    keys = {
        key(base, tmp_path),
        key(changed(base, {"chatTemplate": "tulu"}), tmp_path),
        key(changed(base, {"chatTemplate": None}), tmp_path),  # the tokenizer's own template
        key(changed(base, {"fields": {"messages": "conversation"}}), tmp_path),
        key(changed(base, {"format": "preference"}), tmp_path),
    }
    assert len(keys) == 5
    assert key(changed(base, {"fields": {"text": "body"}}), tmp_path) == key(base, tmp_path)


def test_a_complete_dataset_is_reused_and_the_hit_is_visible(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", ({"text": t} for t in docs(50_000)))
    cfg = config(tmp_path, [str(source)])
    first = run_stage(cfg, tmp_path / "w")
    before = {p: p.stat().st_mtime_ns for p in Path(first["uri"]).rglob("*")}
    metrics = PreprocessMetrics("test-run")
    with caplog.at_level(logging.INFO, logger="kubetrain_trainer.preprocess"):
        second = run_stage({**cfg, "workers": 2}, tmp_path / "w", metrics)
    assert second["cacheHit"] is True and first["cacheHit"] is False
    assert {k: v for k, v in second.items() if k not in ("cacheHit", "seconds")} == {
        k: v for k, v in first.items() if k not in ("cacheHit", "seconds")
    }
    assert "cache hit" in caplog.text
    assert (
        metrics.registry.get_sample_value(
            "kubetrain_preprocess_cache_hits_total", {"run": "test-run"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "kubetrain_preprocess_rows_total",
            {"run": "test-run", "result": "accepted", "reason": ""},
        )
        is None
    ), "nothing was read"
    assert {p: p.stat().st_mtime_ns for p in Path(first["uri"]).rglob("*")} == before
    pointer = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert pointer == {"key": first["key"], "uri": first["uri"], "cacheHit": True}


def test_a_corrupt_shard_is_detected_on_load_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", ({"text": t} for t in docs(50_000)))
    cfg = config(tmp_path, [str(source)])
    result = run_stage(cfg, tmp_path / "w")
    root = Path(result["uri"])
    good = file_hashes(root)
    shard = root / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(dataset.DatasetError, match=r"train-00000\.arrow: sha256 does not match"):
        dataset.verify_dataset(result["uri"])
    with caplog.at_level(logging.WARNING):
        again = run_stage(cfg, tmp_path / "w")
    assert again["cacheHit"] is False and "discarding it" in caplog.text
    assert file_hashes(root) == good
    (root / dataset.SUCCESS).unlink()
    with pytest.raises(dataset.DatasetError, match="no _SUCCESS"):
        dataset.load_manifest(result["uri"])
    assert run_stage(cfg, tmp_path / "w")["cacheHit"] is False, "incomplete: rebuilt"
    assert file_hashes(root) == good
