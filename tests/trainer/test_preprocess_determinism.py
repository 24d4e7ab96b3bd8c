"""Determinism and failure: 1 vs N workers, reruns, SIGKILL mid-run, dying workers, worker counts.

Real: worker processes (spawned), SIGKILL sent by the test to the stage or to one of its workers,
`python -m kubetrain_trainer preprocess` as a subprocess, the filesystem's atomic rename, a poller
that looks at the cache directory while the stage runs. Emulated: the cgroup filesystem (files
written to a temp dir in the kernel's format) for the worker-count rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kubetrain_trainer.preprocess import parallel
from kubetrain_trainer.stage import StageFailure
from preprocess_support import (
    EOS,
    cli,
    config,
    conversations,
    docs,
    file_hashes,
    run_cli,
    run_stage,
    write_jsonl,
)

pytestmark = pytest.mark.slow  # every test starts stage or operator processes

TRAINED = {"train": {"vocabSize": 800, "specialTokens": [EOS]}}


def test_one_and_two_workers_and_reruns_give_identical_bytes(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "t.jsonl", ({"text": t} for t in docs(400_000)))
    hashes = []
    for name, workers in (("one", 1), ("two", 2), ("two-again", 2)):
        cfg = config(tmp_path / name, [str(source)], workers=workers, tokenizer=TRAINED)
        result = run_stage({**cfg, "validationFraction": 0.05}, tmp_path / name / "w")
        hashes.append(file_hashes(Path(result["uri"])))
    assert hashes[0] == hashes[1] == hashes[2]
    assert any(name.startswith("validation-") for name in hashes[0])


def test_chat_packing_is_the_same_with_two_workers(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", conversations(80))
    hashes = []
    for workers in (1, 2):
        cfg = config(tmp_path / str(workers), [str(source)], format="chat", workers=workers)
        result = run_stage({**cfg, "chatTemplate": "chatml", "blockSize": 1024}, tmp_path / "w")
        hashes.append(file_hashes(Path(result["uri"])))
    assert hashes[0] == hashes[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _building(datasets: Path) -> bool:
    """A live run holds the lock of its staging directory (a killed run's lock is free)."""
    for lock in datasets.glob(".tmp-*.lock"):
        with contextlib.suppress(FileNotFoundError), lock.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    return False


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "t.jsonl", ({"text": t} for t in docs(1_200_000)))
    reference = config(tmp_path / "reference", [str(source)], workers=2, tokenizer=TRAINED)
    datasets = tmp_path / "reference" / "cache" / "datasets"
    argv, env = cli(reference, tmp_path / "reference")
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    build_started = build_ended = 0.0
    while process.poll() is None:  # when the build phase starts and ends
        if _building(datasets):
            build_started = build_started or time.monotonic()
            build_ended = time.monotonic()
        time.sleep(0.005)
    until_published, build = build_ended - started, build_ended - build_started
    assert process.returncode == 0 and build > 0
    (expected,) = [p for p in datasets.iterdir() if not p.name.startswith(".")]

    cfg = {**reference, "cacheRoot": str(tmp_path / "cache")}
    watched = tmp_path / "cache" / "datasets"
    violations: list[str] = []
    stop = threading.Event()

    def poll() -> None:  # a reader that looks at the cache all the time
        while not stop.is_set():
            if watched.is_dir():
                for entry in watched.iterdir():
                    if not entry.name.startswith(".") and not (entry / "_SUCCESS").exists():
                        violations.append(entry.name)
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    argv, env = cli(cfg, tmp_path)
    rng = random.Random(20261122)
    building = attempt = 0
    pace = 1.0  # halved whenever a run finished before its kill (the machine got faster)
    try:
        while attempt < 5:
            process = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if attempt >= 3:  # anywhere up to the publication, start-up included
                time.sleep(rng.uniform(0.1, 1.0) * until_published * pace)
            else:  # while the dataset is being built: training, encoding, writing, publishing
                while process.poll() is None and not _building(watched):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.05, 0.8) * build * pace)
            landed = _building(watched)
            children = _children(process.pid)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            deadline = time.monotonic() + 10
            while any(map(_alive, children)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(map(_alive, children)), "workers exit when the stage is killed"
            if process.returncode == 0:  # too late: take the dataset away (atomically) and retry
                assert pace > 1 / 64, "every kill came after the run had finished"
                gone = watched / f".gone-{attempt}"
                os.rename(watched / expected.name, gone)
                shutil.rmtree(gone)
                pace /= 2
                continue
            building += landed
            attempt += 1
        done = run_cli(cfg, tmp_path)
    finally:
        stop.set()
        poller.join()
    assert done.returncode == 0, done.stderr
    assert violations == [], "a dataset was visible without _SUCCESS"
    assert building >= 2, "kills landed while the dataset was being built"
    assert file_hashes(watched / expected.name) == file_hashes(expected)
    assert [p.name for p in watched.iterdir()] == [expected.name], "no staging left behind"


@pytest.mark.slow
def test_a_worker_killed_mid_run_fails_the_stage_with_its_cause(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "t.jsonl", ({"text": t} for t in docs(2_000_000)))
    argv, env = cli(config(tmp_path, [str(source)], workers=2, tokenizer=TRAINED), tmp_path)
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        for pid in _children(process.pid):
            with contextlib.suppress(OSError):  # a child that exited since the listing
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    victim = pid
        time.sleep(0.05)
    assert victim is not None, "the stage started worker processes"
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert f"(pid {victim}) was killed by SIGKILL" in stderr
    assert "out-of-memory killer" in stderr
    assert not [
        p for p in (tmp_path / "cache" / "datasets").iterdir() if not p.name.startswith(".")
    ]


class Doubler:
    """A worker callable: doubles, dies on `die`, raises on `fail`, stage-fails on `refuse`."""

    def __init__(self, die: int = -1, fail: int = -1, refuse: int = -1) -> None:
        self.die, self.fail, self.refuse = die, fail, refuse

    def __call__(self, task: int) -> int:
        if task == self.die:
            os.kill(os.getpid(), signal.SIGKILL)
        if task == self.fail:
            raise ValueError(f"bad task {task}")
        if task == self.refuse:
            raise StageFailure(2, f"task {task} is invalid input")
        return 2 * task


def test_the_pool_keeps_order_and_reports_worker_failures() -> None:
    with parallel.Pool(3) as pool:
        assert list(pool.map(Doubler, (), range(40))) == [2 * i for i in range(40)]
        assert list(pool.map(Doubler, (), range(3))) == [0, 2, 4], "one pool, several maps"
    started = time.monotonic()
    with (
        pytest.raises(parallel.WorkerDied, match=r"was killed by SIGKILL — most often"),
        parallel.Pool(2) as pool,
    ):
        list(pool.map(Doubler, (7,), range(40)))
    assert time.monotonic() - started < 30, "no hang"
    with pytest.raises(RuntimeError, match="ValueError: bad task 5"), parallel.Pool(2) as pool:
        list(pool.map(Doubler, (-1, 5), range(40)))
    with (
        pytest.raises(StageFailure, match="task 3 is invalid") as failure,
        parallel.Pool(2) as pool,
    ):
        list(pool.map(Doubler, (-1, -1, 3), range(40)))
    assert failure.value.exit_code == 2


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content + "\n")
    return root


def test_default_workers_follow_the_cgroup_limits(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    gib = 1 << 30
    unlimited = _cgroup(tmp_path / "a", {"cpu.max": "max 100000", "memory.max": "max"})
    assert parallel.default_workers(unlimited) == cpus
    one_and_half = _cgroup(tmp_path / "b", {"cpu.max": "150000 100000", "memory.max": str(8 * gib)})
    assert parallel.cpu_limit(one_and_half) == 1.5 and parallel.default_workers(one_and_half) == 1
    tight = _cgroup(
        tmp_path / "c", {"cpu.max": "6400000 100000", "memory.max": str(gib + gib // 2)}
    )
    assert parallel.default_workers(tight) == 1, "memory caps the workers"
    v1 = _cgroup(
        tmp_path / "d",
        {
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": str(2**63 - 4096),
        },
    )
    assert parallel.cpu_limit(v1) is None and parallel.memory_limit(v1) is None
    assert parallel.default_workers(v1) == cpus
    assert parallel.default_workers(tmp_path / "none") == cpus
