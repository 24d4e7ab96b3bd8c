"""The inputs users have, and the broken ones: document separators, per-document packing, damaged
files, unreadable files, a full disk.

Real: Python's standard library text (stories are its docstring paragraphs), gzip/zstandard and
pyarrow writing then damaging real files, `python -m kubetrain_trainer preprocess` (in this process
through `__main__.main`, or as a subprocess without the capabilities that let root ignore file
permissions, so that a chmod 000 file is really unreadable), a real 1 MiB tmpfs mounted for the
disk-full case (root on these machines), the tiny Llama of the trainer tests for the attention
check.
Emulated: nothing.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from kubetrain_contract.exit_codes import EXIT_INVALID, EXIT_RETRY
from kubetrain_trainer import data
from kubetrain_trainer.__main__ import main
from kubetrain_trainer.config import AWS_S3
from preprocess_support import ROOT, config, docs, load, run_stage, tokenizer_dir, write_jsonl
from trainer_support import Assets

SEPARATOR = "<|endoftext|>"


def stories(n: int) -> list[str]:
    """n multi-paragraph stories (blank lines inside), from consecutive paragraphs."""
    paragraphs = [p for p in docs() if len(p) < 600]
    return ["\n\n".join(paragraphs[3 * i : 3 * i + 3]) for i in range(n)]


def _stage(cfg: dict[str, Any], tmp: Path) -> tuple[int, dict[str, Any]]:
    path = tmp / "preprocess.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    code = main(["preprocess", "--config", str(path), "--workdir", str(tmp / "work")])
    return code, json.loads((tmp / "work" / "result-preprocess.json").read_text())


def test_tinystories_separators_count_every_story(tmp_path: Path) -> None:
    told = stories(120)
    # TinyStoriesV2's layout: each story, then a line with the separator; one empty story too.
    text = "".join(f"{story}\n{SEPARATOR}\n" for story in told[:60]) + f"{SEPARATOR}\n"
    text += "".join(f"{story}\n{SEPARATOR}\n" for story in told[60:])
    source = tmp_path / "TinyStoriesV2-GPT4-valid.txt"
    source.write_text(text, encoding="utf-8")
    result = run_stage(config(tmp_path, [str(source)], documentSeparator=SEPARATOR), tmp_path / "w")
    manifest, _ = load(result)
    assert result["rowsRead"] == result["accepted"] == len(told) == 120
    assert manifest["splits"]["train"]["documents"] == 120
    # Without the separator the same file is cut at its blank lines: not stories.
    blank = run_stage(config(tmp_path, [str(source)]), tmp_path / "w2")
    assert blank["rowsRead"] > 2 * len(told)
    assert blank["key"] != result["key"]


def test_per_document_packing_keeps_attention_within_documents(
    assets: Assets, tmp_path: Path
) -> None:
    from transformers import LlamaForCausalLM

    source = tmp_path / "stories.txt"
    source.write_text("".join(f"{s}\n{SEPARATOR}\n" for s in stories(40)), encoding="utf-8")
    base = assets.base_model()
    cfg = config(
        tmp_path,
        [str(source)],
        documentSeparator=SEPARATOR,
        crossDocumentAttention=False,
        tokenizer={"uri": str(base)},
    )
    result = run_stage(cfg, tmp_path / "w")
    dataset = data.open_dataset(cfg["datasetPointer"], tmp_path / "probe", AWS_S3)
    assert dataset.columns == ("input_ids", "labels", "position_ids")
    split = dataset.split("train")
    assert split is not None and len(split) == result["trainRows"]
    eos = json.loads((Path(result["uri"]) / "manifest.json").read_text())["tokenizer"]
    # Positions restart right after every EOS, and nowhere else.
    for i in range(len(split)):
        row = split[i]
        after_eos = row["input_ids"][:-1] == eos["eosTokenId"]
        restarts = row["position_ids"][1:] == 0
        assert (restarts == after_eos).all() or i == len(split) - 1  # the padded last block
    row = next(split[i] for i in range(len(split)) if (split[i]["position_ids"] == 0).sum() >= 2)
    ids = torch.from_numpy(row["input_ids"])[None]
    positions = torch.from_numpy(row["position_ids"])[None]
    starts = [0, *[int(i) for i in (positions[0] == 0).nonzero() if i > 0], ids.shape[1]]
    network = LlamaForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        packed = network(input_ids=ids, position_ids=positions).logits
        for start, end in itertools.pairwise(starts):
            alone = network(
                input_ids=ids[:, start:end], position_ids=positions[:, start:end]
            ).logits
            assert torch.allclose(packed[:, start:end], alone, atol=1e-5)
        mixed = network(input_ids=ids).logits  # the control: one sequence mixes documents
        assert not torch.allclose(mixed[:, starts[1] :], packed[:, starts[1] :], atol=1e-3)


def _rows(n: int) -> list[dict[str, str]]:
    return [{"text": t} for t in docs()[:n]]


def _truncated_gzip(path: Path) -> Path:
    payload = gzip.compress("".join(json.dumps(r) + "\n" for r in _rows(300)).encode())
    path.write_bytes(payload[: len(payload) * 2 // 3])
    return path


def _corrupt_zstd(path: Path) -> Path:
    payload = bytearray(
        zstandard.ZstdCompressor().compress(
            "".join(json.dumps(r) + "\n" for r in _rows(300)).encode()
        )
    )
    for i in range(len(payload) // 2, len(payload) // 2 + 64):
        payload[i] ^= 0x5A
    path.write_bytes(bytes(payload))
    return path


def _invalid_parquet(path: Path) -> Path:
    pq.write_table(pa.table({"text": [r["text"] for r in _rows(50)]}), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40] + b"\0" * 40)  # the footer is gone
    return path


@pytest.mark.slow  # starts a stage or operator process
@pytest.mark.parametrize(
    ("make", "name", "says"),
    [
        (_truncated_gzip, "data.jsonl.gz", "the gz stream is truncated or corrupt"),
        (_corrupt_zstd, "data.jsonl.zst", "the zst stream is truncated or corrupt"),
        (_invalid_parquet, "data.parquet", "not a valid Parquet file"),
    ],
)
def test_a_damaged_file_exits_2_naming_it(tmp_path: Path, make: Any, name: str, says: str) -> None:
    bad = make(tmp_path / name)
    good = write_jsonl(tmp_path / "good.jsonl", _rows(20))
    code, result = _stage(config(tmp_path, [str(good), str(bad)]), tmp_path)
    assert code == EXIT_INVALID
    assert result["error"].startswith(f"{bad}: {says}"), result["error"]
    if name.endswith(".gz"):  # where it broke, in lines of the decompressed stream
        assert re.search(r"after line \d+ —", result["error"]), result["error"]
    assert not list((tmp_path / "cache").glob("datasets/.tmp-*"))  # staging removed


@pytest.mark.slow  # starts a stage or operator process
def test_a_missing_file_and_a_broken_tokenizer_exit_2(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", _rows(20))
    code, result = _stage(config(tmp_path, [str(good), str(tmp_path / "absent.jsonl")]), tmp_path)
    assert code == EXIT_INVALID and "absent.jsonl: no such file" in result["error"]
    broken = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir(), broken)
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 2])
    code, result = _stage(config(tmp_path, [str(good)], tokenizer={"uri": str(broken)}), tmp_path)
    assert code == EXIT_INVALID
    assert result["error"].startswith(f"tokenizer.uri: {broken}: tokenizer.json does not load")


#: Root ignores permission bits through two capabilities: the stage runs without them.
WITHOUT_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


@pytest.mark.slow  # starts a stage or operator process
def test_an_unreadable_file_exits_2_naming_it(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", _rows(20))
    secret = write_jsonl(tmp_path / "secret.jsonl", _rows(20))
    secret.chmod(0o000)
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(config(tmp_path, [str(good), str(secret)])))
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "kubetrain_trainer", "preprocess", "--config", str(path)]
    proc = subprocess.run(
        [*WITHOUT_DAC, *argv, "--workdir", str(work)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == EXIT_INVALID, proc.stderr[-2000:]
    error = json.loads((work / "result-preprocess.json").read_text())["error"]
    assert error.startswith(f"sources[train-1]: {secret}: permission denied"), error


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the cache root runs out of space mid-build."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow  # starts a stage or operator process
def test_a_full_disk_is_retryable_and_leaves_no_staging(small_disk: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in docs(2_000_000)])
    cfg = config(tmp_path, [str(source)], cacheRoot=str(small_disk / "cache"))
    code, result = _stage(cfg, tmp_path)
    assert code == EXIT_RETRY, result
    assert result["reason"] == "DiskFull"
    assert "no space left on device" in result["error"] and str(small_disk) in result["error"]
    assert result["bytesNeeded"] > 1 << 20 > result["bytesFree"]
    assert f"about {result['bytesNeeded']} bytes are needed" in result["error"]
    leftovers = [p for p in (small_disk / "cache").rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
