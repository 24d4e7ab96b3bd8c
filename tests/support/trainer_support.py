"""Shared by the trainer tests: datasets from the real preprocess stage, stage configs, launchers.

Everything built here is cached on disk under one directory per test session, so test modules that
each ask for "the text dataset" or "the base model" share one copy (the preprocess stage's own
content-keyed cache makes the second request a cache hit). Stage configs start from the complete
configs the operator's plan writes (tests/support/stage_base.py) and change only what a test
exercises.

`Launcher` runs the real entry point (`python -m kubetrain_trainer …`) in fresh processes that can
be killed. To keep ten kill-and-resume cycles affordable on two cores, the processes are forked
from a warm interpreter that has imported torch and transformers but never run a tensor op; each
child then runs `kubetrain_trainer.__main__.main` exactly as `python -m` would.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpus import paragraphs, write_text_corpus
from kubetrain_operator.plan import deepspeed_config
from kubetrain_trainer.config import (
    MergeConfig,
    PreprocessConfig,
    TrainConfig,
    parse_stage_config,
)
from stage_base import TINY as TINY  # the trainer tests' model, re-exported
from stage_base import base_config, changed, plain_sources

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BLOCK = 64
ENV = {
    "OMP_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore",
}


def stage_config(*changes: dict[str, Any]) -> Any:
    """The planned config of `changes[0]["stage"]` with each change applied in turn, parsed."""
    config = base_config(changes[0]["stage"])
    for change in changes:
        config = changed(config, change)
    return parse_stage_config(config)


def write_config(path: Path, config: TrainConfig | MergeConfig | PreprocessConfig) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(by_alias=True), encoding="utf-8")
    return path


class Assets:
    """Datasets and models the tests train on, built once per session and kept on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def preprocess(self, name: str, doc: dict[str, Any]) -> str:
        """Run the real preprocess stage; returns the dataset pointer URI."""
        from kubetrain_trainer.preprocess import run

        pointer = self.root / name / "dataset.json"
        if not pointer.exists():
            config = stage_config(
                {
                    "stage": "preprocess",
                    "blockSize": BLOCK,
                    "cacheRoot": str(self.root / "cache"),
                    "datasetPointer": str(pointer),
                    "workers": 1,
                },
                doc,
            )
            run(config, self.root / name / "work")
        return str(pointer)

    def stdlib_text(self, name: str, max_bytes: int, doc: dict[str, Any]) -> str:
        """Python's standard library as text (its first max_bytes), preprocessed as `name`."""
        corpus = self.root / f"{name}.txt"
        if not corpus.exists():
            write_text_corpus(corpus, max_bytes)
        return self.preprocess(
            name, {"format": "text", "sources": plain_sources([str(corpus)]), **doc}
        )

    def text(self) -> str:
        """The standard library text with a trained BPE tokenizer (~2k blocks of 64)."""
        return self.stdlib_text(
            "text",
            400_000,
            {
                "validationFraction": 0.05,
                "tokenizer": {"train": {"vocabSize": 1024, "specialTokens": SPECIALS}},
                "chatTemplate": "chatml",
            },
        )

    def base_model(self) -> Path:
        """A tiny Llama pretrained for a few steps by the real train stage (its final/ output)."""
        out = self.root / "base"
        if not (out / "final" / "COMPLETE").exists():
            from kubetrain_trainer import train

            config = train_config(self.text(), out, training={"maxSteps": 40})
            train.run(config, self.root / "base-work")
        return out / "final"

    def jsonl(self, name: str, rows: list[dict[str, Any]]) -> Path:
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    def chat(self) -> str:
        """Docstring paragraphs as conversations: first line asked, the rest answered."""
        rows = []
        for para in paragraphs(300_000):
            lines = [line.strip() for line in para.splitlines() if line.strip()]
            if len(lines) >= 2 and len(" ".join(lines[:3])) < 200:
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": lines[0]},
                            {"role": "assistant", "content": " ".join(lines[1:3])},
                        ]
                    }
                )
        source = self.jsonl("chat", rows[:1500])
        return self.preprocess(
            "chat",
            {
                "format": "chat",
                "sources": plain_sources([str(source)]),
                "validationFraction": 0.05,
                "tokenizer": {"uri": str(self.base_model())},
                "chatTemplate": "chatml",
                "blockSize": 128,
                "maxRejectedFraction": 0.2,
            },
        )

    def preference(self) -> str:
        """Pairs with a learnable rule: chosen is the text, rejected the same text in capitals."""
        rows = []
        for para in paragraphs(200_000):
            lines = [line.strip() for line in para.splitlines() if line.strip()]
            if len(lines) >= 2 and len(" ".join(lines[1:3])) < 120:
                answer = " ".join(lines[1:3])
                rows.append({"prompt": lines[0][:80], "chosen": answer, "rejected": answer.upper()})
        source = self.jsonl("preference", rows[:600])
        return self.preprocess(
            "preference",
            {
                "format": "preference",
                "sources": plain_sources([str(source)]),
                "validationFraction": 0.1,
                "tokenizer": {"uri": str(self.base_model())},
                "chatTemplate": "chatml",
                "blockSize": 128,
                "maxRejectedFraction": 0.2,
            },
        )


def train_config(pointer: str, output: Path | str, **changes: Any) -> TrainConfig:
    """A tiny, fast train-stage config (pretrain from scratch unless changed)."""
    doc = {
        "stage": changes.get("stage", "train"),
        "datasetPointer": pointer,
        "training": {
            "maxSteps": 20,
            "learningRate": 3e-3,
            "lrScheduler": "constant",
            "microBatchSize": 4,
            "precision": "fp32",
            "loggingSteps": 1,
            "seed": 7,
        },
        "checkpoints": {"everySteps": 1000, "keep": 2},
        "outputUri": str(output),
    }
    return stage_config(doc, changes)


def dpo_config(
    assets: Assets, output: Path | str, adapter: str, training: dict[str, Any]
) -> TrainConfig:
    """DPO (beta 0.1) of the tiny base on the preference pairs; adapter "none" trains it all."""
    return train_config(
        assets.preference(),
        output,
        method="dpo",
        dpo={"beta": 0.1},
        model={"uri": str(assets.base_model())},
        adapter={"type": adapter, "r": 8, "alpha": 16, "dropout": 0.0},
        training=training,
    )


def merge_config(pointer: str, base: str, output: Path | str, **changes: Any) -> MergeConfig:
    doc = {
        "stage": "merge",
        "method": "sft",
        "model": {"uri": base},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "merge": True,
        "datasetPointer": pointer,
        "outputUri": str(output),
        "precision": "fp32",
        "microBatchSize": 8,
    }
    return stage_config(doc, changes)


def train_log(workdir: Path, stage: str = "train") -> list[dict[str, Any]]:
    path = workdir / f"{stage}-log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines[:-1]]  # the last piece: "" or a line mid-write


def losses(workdir: Path) -> dict[int, float]:
    """step → training loss as finally recorded (a replayed step's last entry wins)."""
    return {e["step"]: e["loss"] for e in train_log(workdir) if "loss" in e}


def ledger(workdir: Path, rank: int = 0) -> dict[int, list[int]]:
    """step → rows consumed, as finally recorded (replays after a kill overwrite)."""
    path = workdir / "train-samples" / f"rank-{rank:05d}.jsonl"
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {e["step"]: e["rows"] for e in entries}


def result(workdir: Path, stage: str = "train") -> dict[str, Any]:
    return json.loads((workdir / f"result-{stage}.json").read_text(encoding="utf-8"))


def torchrun(
    config: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    entry: list[str] | None = None,
    nproc: int = 2,
) -> subprocess.CompletedProcess[str]:
    """The train stage as `nproc` (two) processes here, under the real `torchrun --standalone`.

    `entry` replaces `-m kubetrain_trainer train` (e.g. a test script that runs the same stage
    and reports what each rank holds, tests/support/zero_probe.py)."""
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *(entry or ["-m", "kubetrain_trainer", "train"]),
        "--config",
        str(config),
        "--workdir",
        str(workdir),
    ]
    return subprocess.run(
        command,
        env={**os.environ, **ENV, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


_ZYGOTE = r"""
import json, os, sys
os.environ.update(json.loads(sys.argv[1]))
import torch, transformers, transformers.trainer  # noqa: F401  (warm imports, no tensor ops)
import kubetrain_trainer.__main__ as entry, kubetrain_trainer.train  # noqa: F401
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(request["env"])
        try:
            code = entry.main(request["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Launcher:
    """Runs `kubetrain_trainer <stage>` in killable processes forked from a warm interpreter."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ENV}
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _ZYGOTE, json.dumps(ENV)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self._read() == {"ready": True}
        self.current: Child | None = None

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the warm launcher died")
        return dict(json.loads(line))

    def start(
        self, stage: str, config_path: Path, workdir: Path, env: dict[str, str] | None = None
    ) -> Child:
        assert self.proc.stdin is not None
        self._reap()
        log = self.log_dir / f"{workdir.name}-{int(time.time() * 1000)}.log"
        request = {
            "argv": [stage, "--config", str(config_path), "--workdir", str(workdir)],
            "log": str(log),
            "env": env or {},
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self.current = Child(self, int(self._read()["pid"]), log)
        return self.current

    def _reap(self) -> None:
        """Kill and collect a child a failed test left running, so replies stay in step."""
        if self.current is not None and self.current.code is None:
            with contextlib.suppress(ProcessLookupError):
                self.current.signal(signal.SIGKILL)
            self.current.wait()

    def run(self, stage: str, config_path: Path, workdir: Path, **kwargs: Any) -> tuple[int, str]:
        child = self.start(stage, config_path, workdir, **kwargs)
        return child.wait(), child.output()

    def close(self) -> None:
        self._reap()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    """A running stage process; `wait` must be called before the launcher takes the next one."""

    def __init__(self, launcher: Launcher, pid: int, log: Path) -> None:
        self.launcher, self.pid, self.log = launcher, pid, log
        self.code: int | None = None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self) -> int:
        if self.code is None:
            self.code = int(self.launcher._read()["code"])
        return self.code

    def output(self) -> str:
        if not self.log.exists():
            return ""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(
        self, condition: Callable[[], bool], timeout: float = 120.0, poll: float = 0.002
    ) -> None:
        """Poll until condition() holds; fail if the process exits or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"condition not met in {timeout}s; log:\n{self.output()[-3000:]}"
                )
            try:
                if Path(f"/proc/{self.pid}/stat").read_text().split()[2] == "Z":
                    raise ProcessLookupError
            except OSError:  # ProcessLookupError, or reaped: /proc/PID is gone
                raise AssertionError(
                    f"the process exited early; log:\n{self.output()[-3000:]}"
                ) from None
            time.sleep(poll)


def resumed_step(output: str) -> int | None:
    """The step a stage process said it resumed from (None: started fresh)."""
    found = re.findall(r"resuming from \S+ \(step (\d+)\)", output)
    return int(found[-1]) if found else None


PROBE = [str(Path(__file__).with_name("zero_probe.py"))]


def operator_deepspeed(zero_stage: int, offload: str = "none") -> dict[str, Any]:
    """The DeepSpeed config the operator's plan generates (Trainer fills its "auto" values)."""
    config = deepspeed_config(zero_stage, offload)
    assert config is not None
    if zero_stage == 3:
        # The operator keeps parameters below 1e6 elements whole on every rank (gathering them
        # costs more than they save on real models); every tensor of this tiny model is below
        # that, so nothing would be sharded and the test would prove nothing. 0 shards them all.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config
