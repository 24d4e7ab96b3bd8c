"""Text format: exact accounting, lossless round trip, every input kind, metrics and the pointer.

Real: Python's standard library text as documents, `tokenizers` BPE training and encoding, gzip,
zstandard, Parquet and Arrow IPC files, the Prometheus exporter over HTTP on loopback, the stage's
own code path (`pipeline.run`, which the CLI calls). Emulated: nothing.
"""

from __future__ import annotations

import gzip
import json
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from kubetrain_trainer.metrics import PreprocessMetrics
from kubetrain_trainer.preprocess.encode import IGNORE
from kubetrain_trainer.preprocess.tokenizer import split_lines, splits_at_lines
from ports import free_port
from preprocess_support import (
    EOS,
    column,
    config,
    docs,
    load,
    run_stage,
    tokenizer_dir,
    write_jsonl,
)


def reference_tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


def split_documents(table: pa.Table, eos: int) -> tuple[list[list[int]], int]:
    """Documents of a split (EOS-separated) and its padding count; checks padding is a tail."""
    ids = [t for row in column(table, "input_ids") for t in row]
    labels = [t for row in column(table, "labels") for t in row]
    padding = labels.count(IGNORE)
    assert labels[len(labels) - padding :] == [IGNORE] * padding, "padding only at the very end"
    assert labels[: len(labels) - padding] == ids[: len(ids) - padding]
    stream = ids[: len(ids) - padding]
    found, current = [], []
    for token in stream:
        if token == eos:
            found.append(current)
            current = []
        else:
            current.append(token)
    assert current == [], "every document ends with EOS"
    return found, padding


def test_exact_accounting_and_lossless_round_trip(tmp_path: Path) -> None:
    texts = list(docs(200_000))
    rows: list[dict[str, object]] = [{"text": t} for t in texts]
    rows[10:10] = [{"text": ""}, {"body": "no text field"}]  # planted: emptyText, missingField
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config(tmp_path, [str(source)], validationFraction=0.1, blockSize=96)
    result = run_stage(cfg, tmp_path / "work")

    assert result["rowsRead"] == len(rows) == result["accepted"] + sum(result["rejected"].values())
    assert result["rejected"] == {"missingField": 1, "emptyText": 1}
    tok = reference_tokenizer()
    eos = tok.token_to_id(EOS)
    decoded: dict[str, list[str]] = {}
    for split in ("train", "validation"):
        manifest, table = load(result, split)
        assert set(pc.list_value_length(table.column("input_ids")).to_pylist()) == {96}
        found, padding = split_documents(table, eos)
        info = manifest["splits"][split]
        assert padding == info["paddingTokens"] and info["documents"] == len(found)
        assert info["tokens"] == sum(len(d) + 1 for d in found), "tokens = documents + separators"
        decoded[split] = [tok.decode(d, skip_special_tokens=False) for d in found]
    # The two splits partition the accepted documents, each in input order.
    train, validation = iter(decoded["train"]), iter(decoded["validation"])
    next_train, next_validation = next(train, None), next(validation, None)
    for text in texts:
        if text == next_train:
            next_train = next(train, None)
        else:
            assert text == next_validation, "a document is missing or out of order"
            next_validation = next(validation, None)
    assert next_train is None and next_validation is None
    assert 0.05 < len(decoded["validation"]) / len(texts) < 0.15
    expected = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
    assert result["trainTokens"] + result["validationTokens"] == result["tokens"] == expected


def test_partial_block_drop_counts_the_tail(tmp_path: Path) -> None:
    texts = list(docs(60_000))
    source = write_jsonl(tmp_path / "train.jsonl", ({"text": t} for t in texts))
    tok = reference_tokenizer()
    total = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
    result = run_stage(config(tmp_path, [str(source)], partialBlock="drop"), tmp_path / "w")
    assert result["droppedTokens"] == total % 64 and result["tokens"] == total - total % 64
    assert result["paddingFraction"] == 0 and result["blocks"] == total // 64


def _txt_safe(texts: list[str]) -> list[str]:
    """Paragraphs without whitespace-only lines (those separate paragraphs in a .txt file)."""
    return [t for t in texts if all(line.strip() for line in t.split("\n"))]


def test_every_input_kind_gives_the_same_tokens(tmp_path: Path) -> None:
    texts = _txt_safe(list(docs(80_000)))
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    inputs = {
        "a.jsonl": body,
        "b.jsonl.gz": gzip.compress(body),
        "c.jsonl.zst": zstandard.ZstdCompressor().compress(body),
        "d.json": json.dumps(rows, indent=1).encode(),
        "e.json": body,  # JSON Lines under .json, as many tools write it
        "f.txt": "\n\n".join(texts).replace("\n", "\r\n").encode("utf-8-sig"),  # BOM, CRLF
    }
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet", row_group_size=100)
    shards = set()
    for name in [*inputs, "g.parquet"]:
        result = run_stage(config(tmp_path / f"r-{name}", [str(tmp_path / name)]), tmp_path / "w")
        assert result["rowsRead"] == result["accepted"] == len(texts), name
        manifest, _ = load(result)
        shards.add(tuple(s["sha256"] for s in manifest["splits"]["train"]["shards"]))
    assert len(shards) == 1, "all kinds and compressions give byte-identical shards"


def test_txt_line_mode_makes_one_document_per_line(tmp_path: Path) -> None:
    lines = [line for t in docs(30_000) for line in t.split("\n") if line.strip()]
    source = tmp_path / "lines.txt"
    source.write_text("\n".join(lines) + "\n\n\n", encoding="utf-8")
    cfg = config(tmp_path, [str(source)], textSplit="line")
    result = run_stage(cfg, tmp_path / "w")
    assert result["rowsRead"] == result["accepted"] == len(lines)
    tok = reference_tokenizer()
    _, table = load(result)
    found, _ = split_documents(table, tok.token_to_id(EOS))
    assert [tok.decode(d, skip_special_tokens=False) for d in found] == lines


def test_a_trained_tokenizer_is_saved_with_the_dataset(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source = write_jsonl(tmp_path / "t.jsonl", ({"text": t} for t in docs(100_000)))
    train = {"vocabSize": 700, "specialTokens": [EOS, "<|pad|>"]}
    result = run_stage(config(tmp_path, [str(source)], tokenizer={"train": train}), tmp_path / "w")
    manifest, table = load(result)
    saved = AutoTokenizer.from_pretrained(Path(result["uri"]) / "tokenizer", local_files_only=True)
    assert len(saved) == manifest["tokenizer"]["vocabSize"] == 700
    assert saved.eos_token == EOS and manifest["tokenizer"]["eosTokenId"] == 0
    assert manifest["tokenizer"]["trained"] is True
    first = column(table, "input_ids")[0]
    assert saved.decode(first).startswith(docs(100_000)[0][:50])


def test_metrics_pointer_and_result(tmp_path: Path) -> None:
    texts = list(docs(50_000))
    rows: list[dict[str, object]] = [{"text": t} for t in texts] + [{"text": 7}]
    source = write_jsonl(tmp_path / "t.jsonl", rows)
    metrics = PreprocessMetrics("test-run")
    port = free_port()
    result = run_stage(config(tmp_path, [str(source)], metricsPort=port), tmp_path / "w", metrics)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"run": "test-run", **labels})

    rows_total = "kubetrain_preprocess_rows_total"
    assert sample(rows_total, result="accepted", reason="") == len(texts)
    assert sample(rows_total, result="rejected", reason="wrongType") == 1
    assert sample("kubetrain_preprocess_read_bytes_total") == source.stat().st_size
    assert sample("kubetrain_preprocess_tokens_total") == result["tokens"]
    assert sample("kubetrain_preprocess_blocks_total") == result["blocks"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        exposition = response.read().decode()
    assert 'kubetrain_preprocess_blocks_total{run="test-run"}' in exposition
    pointer = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert pointer == {"key": result["key"], "uri": result["uri"], "cacheHit": False}
    assert len(json.dumps(result)) < 4096
    assert result["firstRejected"] == {"wrongType": [f"{source}:{len(rows)}"]}


@pytest.mark.parametrize("partial", ["pad", "drop"])
def test_validation_files_make_the_validation_split(tmp_path: Path, partial: str) -> None:
    texts = list(docs(60_000))
    train = write_jsonl(tmp_path / "train.jsonl", ({"text": t} for t in texts[:-20]))
    held = write_jsonl(tmp_path / "val.jsonl", ({"text": t} for t in texts[-20:]))
    cfg = config(tmp_path, [str(train)], validation=[str(held)], partialBlock=partial)
    result = run_stage(cfg, tmp_path / "w")
    manifest, _ = load(result, "validation")
    assert manifest["splits"]["validation"]["documents"] == 20
    assert manifest["splits"]["train"]["documents"] == len(texts) - 20
    assert [i["split"] for i in manifest["inputs"]] == ["train", "validation"]


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(tmp_path: Path) -> None:
    long = "\n".join(docs(400_000))  # one ~400 KB document: cut into ~64 KiB pieces
    assert len(split_lines(long)) > 4
    source = write_jsonl(tmp_path / "long.jsonl", [{"text": long}, {"text": "short"}])
    result = run_stage(config(tmp_path, [str(source)]), tmp_path / "w")
    tok = reference_tokenizer()
    _, table = load(result)
    found, _ = split_documents(table, tok.token_to_id(EOS))
    assert found[0] == tok.encode(long, add_special_tokens=False).ids, "same ids as whole"
    assert tok.decode(found[1]) == "short"


def test_a_tokenizer_that_is_not_line_safe_is_detected() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_level = reference_tokenizer()
    assert splits_at_lines(byte_level)
    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False)
    metaspace.train_from_iterator(docs(50_000), trainer)
    assert not splits_at_lines(metaspace), "SentencePiece-style: every input gets a leading ▁"
