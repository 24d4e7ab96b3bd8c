"""`kubetrain run`: the whole plan locally, end to end, through the real stage contract.

Real: the `kubetrain` CLI as a subprocess, which runs the real preprocess stage (BPE training,
packing), a two-rung sanity ladder and training under torchrun (gloo, CPU) and the merge/eval
stage, on the corpus the project ships; its output read through a pipe, or through a real
pseudo-terminal (`pty`) where a user's terminal would be. Nothing is emulated; the run is the
demo's, shortened (fewer steps). Exit codes are the CLI's (docs/cli.md: 1 invalid input,
3 unhealthy training).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
KUBETRAIN = [sys.executable, "-m", "kubetrain_operator.cli"]

pytestmark = pytest.mark.slow


#: A two-rung CPU ladder: rung 2 overrides the micro-batch size (gpus 0: one CPU process each).
RUNGS = (
    {"gpus": 0, "steps": 10, "minLossDrop": 0.02},
    {"gpus": 0, "steps": 6, "minLossDrop": 0.0, "microBatchSize": 8},
)


def demo_spec(tmp_path: Path, **training: object) -> Path:
    """The demo run with fewer steps, writing under tmp_path."""
    doc = yaml.safe_load((ROOT / "examples" / "tinystories-cpu.yaml").read_text())
    doc["spec"]["data"]["train"] = [str(ROOT / "examples" / "data" / "tinystories-cpu.txt")]
    doc["spec"]["training"].update({"maxSteps": 24, "loggingSteps": 2, **training})
    doc["spec"]["checkpoints"] = {"everySteps": 8, "keep": 2}
    doc["spec"]["sanity"] = {"rungs": [dict(r) for r in RUNGS]}
    doc["spec"]["output"] = {"uri": str(tmp_path / "output")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def kubetrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*KUBETRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def in_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """`kubetrain ARGS` with a pseudo-terminal as stdin, stdout and stderr, as in a shell: its
    exit code and what the terminal showed (escape sequences removed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TTY_COMPATIBLE")}
    main, sub = pty.openpty()
    proc = subprocess.Popen(
        [*KUBETRAIN, *args],
        cwd=cwd,
        env={**env, "OMP_NUM_THREADS": "1", "TERM": "xterm"},
        stdin=sub,
        stdout=sub,
        stderr=sub,
    )
    os.close(sub)
    shown, deadline = bytearray(), time.monotonic() + 900
    while time.monotonic() < deadline:
        if not select.select([main], [], [], 5)[0]:
            continue
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    code = proc.wait(timeout=60)
    return code, ESCAPES.sub("", shown.decode(errors="replace")).replace("\r", "\n")


ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
#: The trainer's INFO line per logging interval (kubetrain_trainer.callbacks.TrainLogCallback).
STEP_LINE = re.compile(r"INFO kubetrain_trainer\.callbacks: step \d+/\d+ loss ")
EMPTY_EPOCH = "There seems not to be a single sample in your epoch_iterator"


def result(workdir: Path, stage: str) -> dict[str, Any]:
    return json.loads((workdir / f"result-{stage}.json").read_text())


def test_whole_plan_runs_then_reuses_its_work(tmp_path: Path) -> None:
    spec, workdir = demo_spec(tmp_path), tmp_path / "work"
    code, shown = in_terminal("run", str(spec), "--workdir", str(workdir), cwd=tmp_path)
    assert code == 0, shown
    for stage in ("preprocess", "sanity-1", "sanity-2", "train", "merge"):
        assert result(workdir, stage)["ok"] is True, stage
        assert (workdir / "logs" / f"{stage}.log").stat().st_size > 0
    # each rung's own result: its steps and its criteria
    for index, rung in enumerate(RUNGS, start=1):
        rung_result = result(workdir, f"sanity-{index}")
        assert rung_result["stage"] == "sanity", rung_result
        assert rung_result["step"] == rung["steps"], rung_result
    assert not (workdir / "result-sanity.json").exists()
    assert result(workdir, "preprocess")["cacheHit"] is False
    final = tmp_path / "output" / "final"
    assert (final / "model.safetensors").exists()
    assert (final / "tokenizer.json").exists()
    assert "output:" in shown and str(tmp_path / "output") in shown
    # In a terminal the bars show the steps: the step lines stay in the stage logs only.
    assert not STEP_LINE.search(shown), shown
    assert STEP_LINE.search((workdir / "logs" / "train.log").read_text())
    # The summary: the figures from the stage results, then each stage's wall time.
    train, merge = result(workdir, "train"), result(workdir, "merge")
    first_loss, last_loss = float(train["firstLoss"]), float(train["loss"])
    assert first_loss > last_loss, train
    assert f"loss {first_loss:.4f} → {last_loss:.4f}" in shown, shown
    assert f"validation perplexity {float(merge['perplexity']):.3f}" in shown
    assert f"{float(train['tokensPerSecond']):,.0f} tokens/s" in shown
    for stage in ("preprocess", "merge"):
        assert re.search(rf"^  {stage} +(\d+m)?\d+s$", shown, flags=re.M), (stage, shown)
    # The stages that trained add their measured peak beside the memory model's estimate.
    for stage in ("sanity-1", "sanity-2", "train"):
        figures = r"peak [\d.]+ [MG]iB RSS, estimate [\d.]+ [MG]iB, [\d,]+ tokens/s"
        line = rf"^  {stage} +(\d+m)?\d+s  {figures}$"
        assert re.search(line, shown, flags=re.M), (stage, shown)

    again = kubetrain("run", str(spec), "--workdir", str(workdir), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert result(workdir, "preprocess")["cacheHit"] is True
    assert "sanity-1: passed before with the same config — skipped" in again.stderr
    assert "sanity-2: passed before with the same config — skipped" in again.stderr
    # Training was complete: said plainly, without transformers' warning about an empty epoch.
    assert "train: complete at step 24 — nothing left to train" in again.stderr
    assert EMPTY_EPOCH not in again.stdout + again.stderr
    # Not a terminal: every line as before, the trainer's INFO lines included.
    assert "stage complete at step 24: nothing left to train" in again.stderr
    assert re.search(r"^  sanity-1 +skipped$", again.stderr, flags=re.M), again.stderr


def test_a_failing_first_rung_stops_before_the_second(tmp_path: Path) -> None:
    spec, workdir = demo_spec(tmp_path), tmp_path / "work"
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["sanity"]["rungs"][0]["minLossDrop"] = 0.99  # no 10 steps drop the loss by 99 %
    spec.write_text(yaml.safe_dump(doc))
    code, shown = in_terminal(
        "run", str(spec), "--workdir", str(workdir), "--verbose", cwd=tmp_path
    )
    assert code == 3, shown  # unhealthy training: no retry
    assert STEP_LINE.search(shown), shown  # --verbose: the step lines in the terminal too
    first = result(workdir, "sanity-1")
    assert first["ok"] is False and first["exitCode"] == 3
    assert not (workdir / "result-sanity-2.json").exists()
    assert not (workdir / "logs" / "sanity-2.log").exists()
    assert not (workdir / "result-train.json").exists()
    assert "sanity-1 failed (exit 3)" in shown


def test_invalid_run_file_exits_1_naming_the_field(tmp_path: Path) -> None:
    spec = demo_spec(tmp_path)
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["training"]["precision"] = "fp16"  # needs a GPU
    spec.write_text(yaml.safe_dump(doc))
    proc = kubetrain("run", str(spec), cwd=tmp_path)
    assert proc.returncode == 1
    assert "spec.training.precision: fp16 needs a GPU" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_resumes(tmp_path: Path) -> None:
    spec, workdir = demo_spec(tmp_path, maxSteps=400), tmp_path / "work"
    prep = kubetrain(
        "run", str(spec), "--workdir", str(workdir), "--stage", "preprocess", cwd=tmp_path
    )
    assert prep.returncode == 0, prep.stderr
    port = free_port()
    proc = subprocess.Popen(
        [
            *KUBETRAIN,
            "run",
            str(spec),
            "--workdir",
            str(workdir),
            "--stage",
            "train",
            "--metrics-port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    from kubetrain_operator.local import scrape

    deadline = time.monotonic() + 300
    while scrape(port).get("kubetrain_train_step", 0) < 12:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    assert "run the same command to resume" in out
    checkpoints = sorted((tmp_path / "output" / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").exists(), out
    stopped_at = int(checkpoints[-1].name.removeprefix("step-"))
    assert stopped_at >= 12

    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["training"]["maxSteps"] = stopped_at + 4
    spec.write_text(yaml.safe_dump(doc))
    resumed = kubetrain(
        "run", str(spec), "--workdir", str(workdir), "--stage", "train", cwd=tmp_path
    )
    # Same output location, so the trainer resumes from the newest complete checkpoint.
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert result(workdir, "train")["resumedFrom"] == stopped_at
    assert STEP_LINE.search(resumed.stderr), resumed.stderr  # a pipe: every line as before
