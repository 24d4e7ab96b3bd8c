"""Hostile inputs to the preprocess stage: links out of the claim, FIFOs, devices, swapped files.

Real: the stage's code (in this process, or `python -m kubetrain_trainer preprocess` where the
planted variable must be in the stage process's own `/proc/self/environ`), real symlinks, a real
FIFO (os.mkfifo), the real `/dev/zero`, the test tokenizer, boto3 against a real `moto_server`
(S3 itself emulated by moto). The swap of an input "while the stage reads it" is made between the
stage's two steps, `locate` (fingerprint, key) and `build` (read, publish), called in turn.
Emulated: S3 (moto); a claim is a directory under `$KUBETRAIN_PVC_ROOT`, where the operator
mounts it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetrain_contract.exit_codes import EXIT_INVALID, EXIT_RETRY
from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.metrics import PreprocessMetrics
from kubetrain_trainer.preprocess import pipeline
from kubetrain_trainer.stage import StageFailure
from preprocess_support import config, docs, parse, run_cli, run_stage, tokenizer_dir, write_jsonl

ENVIRON = Path("/proc/self/environ")


def _rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    return [{"text": t} for t in docs()[offset : offset + n]]


def _published_bytes(*trees: Path) -> bytes:
    """Every byte of every file under the trees (the cache, the output, the work directory)."""
    return b"".join(p.read_bytes() for t in trees for p in sorted(t.rglob("*")) if p.is_file())


@pytest.mark.slow  # the planted variable must be in the stage process's own environment
@pytest.mark.parametrize("linked", ["input", "tokenizer"])
def test_a_link_to_the_pods_environment_is_refused_and_nothing_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: str
) -> None:
    planted = f"planted-{secrets.token_hex(16)}"
    monkeypatch.setenv("KUBETRAIN_TEST_PLANTED", planted)
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path / "pvc"))
    claim = tmp_path / "pvc" / "data"
    (claim / "text").mkdir(parents=True)
    (claim / "text" / "a.txt").write_text("\n\n".join(docs()[:200]), encoding="utf-8")
    tokenizer = claim / "tokenizer"
    shutil.copytree(tokenizer_dir(), tokenizer)
    entry = {"input": claim / "text" / "b.txt", "tokenizer": tokenizer / "merges.txt"}[linked]
    entry.symlink_to(ENVIRON)
    cfg = config(tmp_path, ["pvc://data/text/*.txt"], tokenizer={"uri": "pvc://data/tokenizer"})
    proc = run_cli(cfg, tmp_path, timeout=120)
    assert proc.returncode == EXIT_INVALID, proc.stderr[-2000:]
    named = "pvc://data/" + entry.relative_to(claim).as_posix()
    assert named in proc.stderr and "/proc/" in proc.stderr
    assert planted.encode() not in _published_bytes(tmp_path / "cache", tmp_path / "out")
    assert planted.encode() not in _published_bytes(tmp_path / "work")
    assert planted not in proc.stdout + proc.stderr


@pytest.mark.timeout(30)
def test_a_fifo_input_is_refused_before_any_read(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", _rows(20))
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(StageFailure) as failed:
        run_stage(config(tmp_path, [str(good), str(fifo)]), tmp_path / "work")
    assert failed.value.exit_code == EXIT_INVALID
    assert f"{fifo}: is a FIFO, not a regular file" in failed.value.message


@pytest.mark.timeout(30)
def test_a_link_to_dev_zero_is_refused_before_any_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", _rows(20))
    (data / "zeros.jsonl").symlink_to("/dev/zero")
    with pytest.raises(StageFailure) as failed:
        run_stage(config(tmp_path, [str(data / "zeros.jsonl")]), tmp_path / "work")
    assert failed.value.exit_code == EXIT_INVALID
    assert f"{data / 'zeros.jsonl'}: is a character device" in failed.value.message


def _swap_between_locate_and_build(
    tmp_path: Path, cfg: dict[str, Any], replace: Callable[[], object]
) -> tuple[StageFailure, str]:
    """locate (fingerprint, key), replace the input, build: the failure and the key's URI."""
    parsed = parse(cfg)
    work = tmp_path / "work"
    where = pipeline.locate(parsed, work)
    replace()
    with pytest.raises(StageFailure) as failed:
        pipeline.build(parsed, work, where, PreprocessMetrics(parsed.run))
    return failed.value, where.uri


def test_a_local_input_replaced_after_fingerprinting_is_not_published(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "a.jsonl", _rows(200))
    swapped = write_jsonl(tmp_path / "b.jsonl", _rows(200, offset=200))
    error, uri = _swap_between_locate_and_build(
        tmp_path, config(tmp_path, [str(source)]), lambda: os.replace(swapped, source)
    )
    assert error.exit_code == EXIT_RETRY
    assert f"{source}: the input changed while the stage read it" in error.message
    assert not storage.exists(uri) and not storage.exists(storage.join(uri, "_SUCCESS"))


@pytest.mark.slow  # moto_server
def test_an_s3_input_replaced_after_fingerprinting_is_not_published(
    tmp_path: Path, moto_endpoint: str
) -> None:
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"kt-{uuid.uuid4().hex[:10]}"
    storage.client(s3).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/data/a.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in _rows(200))
    storage.write_text(uri, body, s3)
    other = "".join(json.dumps(r) + "\n" for r in _rows(200, offset=200))
    cfg = config(tmp_path, [uri], s3=s3.model_dump(by_alias=True))
    error, where = _swap_between_locate_and_build(
        tmp_path, cfg, lambda: storage.write_text(uri, other, s3)
    )
    assert error.exit_code == EXIT_RETRY
    assert f"{uri}: the input changed while the stage read it" in error.message
    assert not Path(where).exists()
