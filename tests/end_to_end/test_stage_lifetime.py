"""One trainer per output, and stage processes that die with their launcher — through `kubetrain
run`, as a user meets it (seed 001's duplicate trainers).

Real: the `kubetrain` CLI as a subprocess running the real stages (torchrun, the trainer), the
kernel's `flock` on the output's lock file and `prctl(PR_SET_PDEATHSIG)`, SIGKILL of the CLI's
whole process group (a closed terminal, the OOM killer), /proc to find what survives. Emulated:
nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBETRAIN = [sys.executable, "-m", "kubetrain_operator.cli"]

pytestmark = pytest.mark.slow


def long_spec(tmp_path: Path) -> Path:
    """The demo run, long enough to be interrupted, without a sanity ladder."""
    doc = yaml.safe_load((ROOT / "examples" / "tinystories-cpu.yaml").read_text())
    doc["spec"]["data"]["train"] = [str(ROOT / "examples" / "data" / "tinystories-cpu.txt")]
    doc["spec"]["training"].update({"maxSteps": 5000, "loggingSteps": 1})
    doc["spec"]["checkpoints"] = {"everySteps": 20, "keep": 2}
    doc["spec"].pop("sanity", None)
    doc["spec"]["output"] = {"uri": str(tmp_path / "output")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(spec: Path, workdir: Path, log: Path) -> subprocess.Popen[bytes]:
    """`kubetrain run … --stage train` in a process group of its own (a terminal's job)."""
    return subprocess.Popen(
        [*KUBETRAIN, "run", str(spec), "--workdir", str(workdir), "--stage", "train"],
        cwd=spec.parent,
        env=_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _training(workdir: Path) -> bool:
    log = workdir / "train-log.jsonl"
    return log.exists() and log.stat().st_size > 0


def stage_processes(workdir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every live process started for this workdir's stages."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # exited while we looked
            continue
        line = " ".join(a.decode(errors="replace") for a in argv)
        if str(workdir) in line and state != "Z" and int(entry.name) != os.getpid():
            found.append((int(entry.name), line))
    return found


@pytest.fixture
def prepared(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A spec whose dataset is built (the preprocess stage ran), and its workdir."""
    spec, workdir = long_spec(tmp_path), tmp_path / "work"
    prep = subprocess.run(
        [*KUBETRAIN, "run", str(spec), "--workdir", str(workdir), "--stage", "preprocess"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    yield spec, workdir
    for pid, _ in stage_processes(tmp_path):  # never leave a trainer behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_second_kubetrain_run_on_the_same_output_refuses_at_once(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, workdir = prepared
    first = _start(spec, workdir, tmp_path / "first.log")
    try:
        _wait(lambda: _training(workdir), "the first trainer never trained")
        holder = json.loads((tmp_path / "output" / ".kubetrain.lock").read_text())
        started = time.monotonic()
        second = subprocess.run(
            [*KUBETRAIN, "run", str(spec), "--workdir", str(tmp_path / "work2")],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode != 0
        assert time.monotonic() - started < 120  # at its first stage, not after training
        said = second.stdout + second.stderr
        assert "another kubetrain stage is writing this output" in said, said[-3000:]
        assert f"train stage, pid {holder['pid']}" in said
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_sigkill_of_kubetrain_run_leaves_no_stage_process(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    spec, workdir = prepared
    cli = _start(spec, workdir, tmp_path / "cli.log")
    _wait(lambda: _training(workdir), "the trainer never trained")
    printed = (tmp_path / "cli.log").read_text(encoding="utf-8", errors="replace")
    assert re.search(r"train: metrics at http://127\.0\.0\.1:\d+/metrics", printed), printed
    assert len(stage_processes(workdir)) >= 2  # torchrun and the trainer
    os.killpg(cli.pid, signal.SIGKILL)  # the CLI's process group: what a closed terminal does
    cli.wait()
    deadline = time.monotonic() + 10
    while stage_processes(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stage_processes(workdir) == []
    # The lock went with them: a re-run trains on the same output at once.
    trained = (workdir / "train-log.jsonl").stat().st_size
    again = _start(spec, workdir, tmp_path / "again.log")
    try:
        _wait(
            lambda: (workdir / "train-log.jsonl").stat().st_size > trained,
            "the re-run never trained",
        )
        assert "another kubetrain stage" not in (tmp_path / "again.log").read_text()
    finally:
        os.killpg(again.pid, signal.SIGKILL)
        again.wait()


def test_the_preprocessing_bar_shows_bytes_read_of_the_input() -> None:
    from kubetrain_operator.local import read_of

    assert read_of(12_345_678, 56_000_000) == "12.3/56.0 MB"
    assert read_of(1_000_000, None) == "1.0 MB"
