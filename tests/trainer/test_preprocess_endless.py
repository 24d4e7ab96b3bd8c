"""Rows that made tokenizer training endless: one long "word" of a mebibyte.

Real: the preprocess stage (in this process, and as `python -m kubetrain_trainer preprocess` for
the signal), the `tokenizers` BPE trainer, SIGTERM delivered by the kernel. The long word is a
seeded random string of two letters: every pair occurs everywhere in it, the BPE trainer's worst
case (unbounded, 100 KiB took 5 s and 1 MiB minutes). Emulated: nothing.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetrain_trainer.preprocess import dataset
from preprocess_support import EOS, ROOT, cli, config, docs, run_stage, write_jsonl

TRAINED = {"train": {"vocabSize": 600, "specialTokens": [EOS]}}
#: Generous for two shared cores; the word's training took minutes before its length was bound.
SECONDS = 60


def long_word_input(tmp_path: Path, nbytes: int = 1 << 20) -> tuple[Path, str, int]:
    """A JSONL file of ordinary documents and one row that is a single `nbytes` word; the word
    and the number of rows."""
    word = "".join(random.Random(16).choice("ab") for _ in range(nbytes))
    rows = [{"text": text} for text in docs(20_000) if text.strip()] + [{"text": word}]
    return write_jsonl(tmp_path / "long-word.jsonl", rows), word, len(rows)


def test_a_one_word_row_of_a_mebibyte_trains_and_encodes_in_seconds(tmp_path: Path) -> None:
    source, word, rows = long_word_input(tmp_path)
    cfg = config(tmp_path, [str(source)], tokenizer=TRAINED, blockSize=256)
    outcome: dict[str, Any] = {}

    def build() -> None:
        outcome["result"] = run_stage(cfg, tmp_path / "work")

    # A daemon thread: an unbounded merge phase cannot be interrupted, only abandoned.
    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(SECONDS)
    assert not worker.is_alive(), f"tokenizer training still running after {SECONDS}s"
    result = outcome["result"]
    assert result["cacheHit"] is False and result["accepted"] == rows

    from tokenizers import Tokenizer

    path, _ = dataset.verify_dataset(result["uri"])
    saved = Tokenizer.from_file(str(path / dataset.TOKENIZER_DIR / "tokenizer.json"))
    ids = saved.encode(word, add_special_tokens=False).ids
    assert saved.decode(ids) == word, "the word is cut for training only: encoding is lossless"


@pytest.mark.slow  # starts the stage process
def test_sigterm_during_tokenizer_training_exits_143_within_seconds(tmp_path: Path) -> None:
    source, _, _ = long_word_input(tmp_path)
    argv, env = cli(config(tmp_path, [str(source)], tokenizer=TRAINED), tmp_path)
    log_path = tmp_path / "stage.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + SECONDS
            while "training a byte-level BPE tokenizer" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline, "tokenizer training never started"
                time.sleep(0.05)
            time.sleep(0.5)  # into the merges
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = proc.wait(timeout=SECONDS)
        finally:
            proc.kill()
            proc.wait()
    waited = time.monotonic() - sent
    assert code == 143, log_path.read_text()[-2000:]
    assert waited < 15, f"SIGTERM took {waited:.1f}s to end the stage"
    assert not list((tmp_path / "cache").rglob(dataset.SUCCESS)), "nothing is published"
