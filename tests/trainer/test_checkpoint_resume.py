"""Checkpoints and exact resume, through the trainer's real entry point in processes we kill.

Real: the preprocess stage building the dataset, `python -m kubetrain_trainer train` (HF Trainer,
the packed dataset, checkpoint finalisation and resume), SIGKILL and SIGTERM delivered by the
kernel, the files on disk. Emulated: a crashed node is a SIGKILLed process; process start-up is
forked from a warm interpreter (tests/support/trainer_support.py) to make eleven restarts
affordable.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from trainer_support import (
    Assets,
    Launcher,
    ledger,
    losses,
    result,
    resumed_step,
    train_config,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 30
#: 4 × 2 = 8 samples per step over ~180 rows: the 30 steps cross an epoch boundary.
TRAINING = {"maxSteps": STEPS, "microBatchSize": 4, "gradientAccumulationSteps": 2}


@pytest.fixture(scope="module")
def small_text(assets: Assets) -> str:
    """A small text dataset (~180 blocks), so that a short run sees every row and starts over."""
    return assets.stdlib_text(
        "small-text",
        30_000,
        {"tokenizer": {"train": {"vocabSize": 600, "specialTokens": ["<|endoftext|>"]}}},
    )


def _config_file(root: Path, pointer: str, **changes: Any) -> Path:
    """The TRAINING run on pointer: its config written to root/train.json, its output root/out."""
    return write_config(
        root / "train.json", train_config(pointer, root / "out", training=TRAINING, **changes)
    )


def _rows(pointer: str) -> int:
    manifest_uri = json.loads(Path(pointer).read_text())["uri"]
    return int(
        json.loads((Path(manifest_uri) / "manifest.json").read_text())["splits"]["train"]["rows"]
    )


@pytest.fixture(scope="module")
def straight(small_text: str, launcher: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 30 steps in one go."""
    root = tmp_path_factory.mktemp("straight")
    config = _config_file(root, small_text)
    code, output = launcher.run("train", config, root / "work")
    assert code == 0, output[-3000:]
    return root / "work"


def _complete(directory: Path) -> bool:
    """The test's own reading of a COMPLETE marker: every listed file there, at its size."""
    try:
        meta = json.loads((directory / "COMPLETE").read_text())
    except (OSError, ValueError):
        return False
    try:
        return all(
            (directory / rel).stat().st_size == entry["bytes"]
            for rel, entry in meta["files"].items()
        )
    except FileNotFoundError:  # rotated away while we looked
        return False


def _entries(staging: Path) -> list[Path]:
    """What the directory holds now (the trainer renames and rotates under our feet)."""
    try:
        return list(staging.iterdir())
    except FileNotFoundError:
        return []


def _created_after(path: Path, started: float) -> bool:
    try:
        return path.stat().st_ctime > started
    except FileNotFoundError:  # renamed to step-N or rotated away since the listing
        return False


def _newest_complete(staging: Path) -> int | None:
    steps = [int(p.name.rpartition("-")[2]) for p in _entries(staging) if _complete(p)]
    return max(steps, default=None)


def test_resume_after_two_sigkills_is_exact(
    small_text: str, launcher: Launcher, straight: Path, tmp_path: Path
) -> None:
    config = _config_file(tmp_path, small_text, checkpoints={"everySteps": 5, "keep": 2})
    workdir, staging = tmp_path / "work", tmp_path / "out" / "checkpoints"
    resumed_from: list[int | None] = []
    newest: int | None = None
    for kill_after in (10, 20):
        child = launcher.start("train", config, workdir)
        child.wait_for(lambda s=kill_after: (_newest_complete(staging) or 0) >= s)
        child.signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        resumed_from.append(resumed_step(child.output()))
        assert resumed_from[-1] == newest
        newest = _newest_complete(staging)
        assert newest is not None and newest >= kill_after
    child = launcher.start("train", config, workdir)
    assert child.wait() == 0, child.output()[-3000:]
    assert resumed_step(child.output()) == newest
    assert result(workdir)["step"] == STEPS

    expected, got = losses(straight), losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-6

    # The effective sample stream is the uninterrupted run's, and within each pass over the data
    # every row appears exactly once.
    reference, effective = ledger(straight), ledger(workdir)
    assert effective == reference
    stream = [row for step in range(1, STEPS + 1) for row in effective[step]]
    rows = _rows(small_text)
    assert len(stream) > rows  # the run crossed an epoch boundary
    for start in range(0, len(stream), rows):
        epoch = stream[start : start + rows]
        assert len(set(epoch)) == len(epoch)
        if len(epoch) == rows:
            assert sorted(epoch) == list(range(rows))


def test_sigkill_during_checkpoint_writes_resumes_from_newest_complete(
    small_text: str, launcher: Launcher, straight: Path, tmp_path: Path
) -> None:
    config = _config_file(tmp_path, small_text, checkpoints={"everySteps": 1, "keep": 2})
    workdir, staging = tmp_path / "work", tmp_path / "out" / "checkpoints"
    newest: int | None = None
    mid_write = 0
    for _ in range(10):
        started = time.time()
        child = launcher.start("train", config, workdir)

        def writing(started: float = started) -> bool:
            """A checkpoint directory this process created (crash leftovers are older)."""
            return any(
                p.name.startswith("checkpoint-") and _created_after(p, started)
                for p in _entries(staging)
            )

        child.wait_for(writing, poll=0.0005)
        child.signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        assert resumed_step(child.output()) == newest
        mid_write += any(
            p.name.startswith("checkpoint-") and not (p / "COMPLETE").exists()
            for p in _entries(staging)
        )
        newest = _newest_complete(staging)
    assert mid_write >= 8, f"only {mid_write} of 10 kills landed inside a checkpoint write"
    child = launcher.start("train", config, workdir)
    assert child.wait() == 0, child.output()[-3000:]
    assert resumed_step(child.output()) == newest
    got, expected = losses(workdir), losses(straight)
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-6
    kept = sorted(p.name for p in staging.iterdir())
    assert kept == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]  # keep 2, no leftovers


def test_sigterm_saves_a_checkpoint_and_exits_143(
    small_text: str, launcher: Launcher, straight: Path, tmp_path: Path
) -> None:
    config = _config_file(tmp_path, small_text)
    workdir = tmp_path / "work"
    child = launcher.start("train", config, workdir)
    child.wait_for(lambda: len(losses(workdir)) >= 3)
    child.signal(signal.SIGTERM)
    assert child.wait() == 143, child.output()[-3000:]
    stopped = result(workdir)
    assert stopped["exitCode"] == 143 and stopped["ok"] is False
    step = stopped["checkpoint"]["step"]
    assert step == stopped["step"] < STEPS
    assert _complete(tmp_path / "out" / "checkpoints" / f"step-{step:08d}")
    child = launcher.start("train", config, workdir)
    assert child.wait() == 0
    assert resumed_step(child.output()) == step
    got, expected = losses(workdir), losses(straight)
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-6
