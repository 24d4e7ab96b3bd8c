"""Helpers shared by the preprocess tests (this module holds no tests).

Real: the text (Python's standard library via tests/support/corpus.py), the `tokenizers` BPE
trainer, transformers' tokenizer loading and chat templates, the stage entry point. Nothing is
emulated here.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from corpus import paragraphs
from kubetrain_trainer.config import PreprocessConfig, parse_stage_config
from kubetrain_trainer.metrics import PreprocessMetrics
from kubetrain_trainer.preprocess import dataset, pipeline, tokenizer
from stage_base import base_config, changed, plain_sources, source

ROOT = Path(__file__).resolve().parents[2]
EOS = "<|endoftext|>"
#: The "model's own" template of the test tokenizer: chatml without generation markers, as a model
#: repository would ship it. Our masks must not depend on markers.
OWN_TEMPLATE = (
    tokenizer.TEMPLATES["chatml"].replace("{% generation %}", "").replace("{% endgeneration %}", "")
)
__all__ = ["plain_sources", "source"]
SPECIALS = [EOS, "<|pad|>", *(t for tokens in tokenizer.TEMPLATE_TOKENS.values() for t in tokens)]


@functools.lru_cache(maxsize=8)
def docs(max_bytes: int = 300_000) -> tuple[str, ...]:
    """Paragraphs of the standard library (real text nobody here wrote)."""
    return tuple(paragraphs(max_bytes))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    """A transformers tokenizer directory (BPE 1000 trained on the corpus), made once."""
    from transformers import PreTrainedTokenizerFast

    plan = tokenizer.TokenizerPlan("test", None, None, tuple(SPECIALS), 1000, 2)
    trained = tokenizer.train((list(docs())[i : i + 500] for i in range(0, 2000, 500)), plan)
    hf = PreTrainedTokenizerFast(tokenizer_object=trained, eos_token=EOS, pad_token="<|pad|>")
    hf.chat_template = OWN_TEMPLATE
    path = Path(tempfile.mkdtemp(prefix="kubetrain-test-tokenizer-"))
    atexit.register(shutil.rmtree, path, True)
    hf.save_pretrained(str(path))
    return path


def config(
    tmp: Path, train: list[str], validation: list[str] | None = None, **overrides: Any
) -> dict[str, Any]:
    """A complete preprocess stage config (wire format): the planned one
    (tests/support/stage_base.py) with `train` and `validation` as plain sources (as the plan
    writes data.train and data.validation), the test tokenizer, one worker and paths under `tmp`,
    then `overrides` (merged into nested blocks, see :func:`stage_base.changed`)."""
    test: dict[str, Any] = {
        "run": "test-run",
        "sources": plain_sources(train, validation),
        "cacheRoot": str(tmp / "cache"),
        "datasetPointer": str(tmp / "out" / "dataset.json"),
        "workers": 1,
    }
    if "tokenizer" not in overrides:
        test["tokenizer"] = {"uri": str(tokenizer_dir())}
    return changed(changed(base_config("preprocess"), test), overrides)


def parse(cfg: dict[str, Any]) -> PreprocessConfig:
    parsed = parse_stage_config(cfg)
    assert isinstance(parsed, PreprocessConfig)
    return parsed


def run_stage(
    cfg: dict[str, Any], workdir: Path, metrics: PreprocessMetrics | None = None
) -> dict[str, Any]:
    """The stage in this process: the same code path as the CLI, minus interpreter start-up."""
    return pipeline.run(parse(cfg), workdir, metrics)


def cli(cfg: dict[str, Any], tmp: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `python -m kubetrain_trainer preprocess` (what the Job runs)."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"config-{hashlib.sha256(json.dumps(cfg).encode()).hexdigest()[:8]}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    argv = [sys.executable, "-m", "kubetrain_trainer", "preprocess", "--config", str(path)]
    argv += ["--workdir", str(tmp / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return argv, env


def run_cli(
    cfg: dict[str, Any], tmp: Path, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    argv, env = cli(cfg, tmp)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under a directory, by relative path."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def load(result: dict[str, Any], split: str = "train") -> tuple[dict[str, Any], pa.Table]:
    """The verified manifest and one split of the dataset a run published."""
    path, manifest = dataset.verify_dataset(result["uri"])
    return manifest, dataset.open_split(path, manifest, split)


def column(table: pa.Table, name: str) -> list[list[int]]:
    return [list(row) for row in table.column(name).to_pylist()]


def conversations(n: int) -> list[dict[str, Any]]:
    """Chat rows of consecutive corpus paragraphs: optional system, 1–3 user/assistant turns."""
    text = [d[:400] for d in docs() if d.strip()]
    rows, at = [], 0
    for i in range(n):
        messages = [{"role": "system", "content": text[at]}] if i % 3 == 0 else []
        at += 1 if i % 3 == 0 else 0
        for _ in range(1 + i % 3):
            messages += [
                {"role": "user", "content": text[at]},
                {"role": "assistant", "content": text[at + 1]},
            ]
            at += 2
        rows.append({"messages": messages})
    return rows


def preference_rows(n: int) -> list[dict[str, Any]]:
    """prompt/chosen/rejected rows from consecutive paragraphs; every other prompt as messages."""
    text = [d[:300] for d in docs() if d.strip()]
    rows = []
    for i in range(n):
        prompt: Any = text[3 * i]
        if i % 2:
            prompt = [
                {"role": "system", "content": text[3 * i + 1][:50]},
                {"role": "user", "content": prompt},
            ]
        rows.append({"prompt": prompt, "chosen": text[3 * i + 1], "rejected": text[3 * i + 2]})
    return rows
