"""No code from the Hugging Face Hub at run time: kernels come only from the image.

Real: the train stage as its own process (`python -m kubetrain_trainer train`, as the pods run
it), bitsandbytes (whose CPU backend asks the `kernels` package for a Hub kernel at import),
transformers, `kernels` and huggingface_hub with their HTTP clients, the tiny base model and
tokenizer the trainer tests build (local directories), the operator's plan of every example.
Emulated: the Hub — a stdlib HTTP server
on 127.0.0.1 that answers 404 and records every request, with `HF_ENDPOINT` pointing at it.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetrain_contract.layout import HUB_KERNELS_ENV
from runspecs import all_documents, local_documents, planned
from trainer_support import ENV, PYTHON, ROOT, Assets, train_config, write_config

TRUST_CHECK = "Skipping publisher trust check"


def test_every_planned_stage_turns_hub_kernels_off() -> None:
    runs = [planned(doc) for doc in all_documents().values()]
    runs += [planned(doc, target="local") for doc in local_documents().values()]
    for run, plan in runs:
        for stage in plan.stages:
            env = {e["name"]: e.get("value") for e in stage.env}
            assert env.get(HUB_KERNELS_ENV) == "NO", (run.metadata.name, stage.name)


class _Recorder(BaseHTTPRequestHandler):
    def _record(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hub_requests() -> Iterator[tuple[str, list[str]]]:
    """A Hub endpoint that answers nothing useful and remembers what was asked of it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.requests  # type: ignore[attr-defined]
    server.shutdown()


def _train(assets: Assets, tmp_path: Path, env: dict[str, str]) -> str:
    """One step of SFT on the local base model and tokenizer, as a stage process; its output."""
    config = train_config(
        assets.text(),
        tmp_path / "out",
        method="sft",
        model={"uri": str(assets.base_model())},
        training={"maxSteps": 1},
    )
    path = write_config(tmp_path / "train.json", config)
    argv = [PYTHON, "-m", "kubetrain_trainer", "train", "--config", str(path)]
    argv += ["--workdir", str(tmp_path / "work")]
    hub = ("HF_HUB_OFFLINE", "HF_ENDPOINT")  # each test says how the Hub is reached
    base = {k: v for k, v in {**os.environ, **ENV}.items() if k not in hub}
    # An empty Hugging Face cache: a kernel cached by anything else on this machine plays no part.
    env = {**base, "HF_HOME": str(tmp_path / "hf"), **env}
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_stage_does_not_log_the_hub_kernel_trust_check(assets: Assets, tmp_path: Path) -> None:
    output = _train(assets, tmp_path, {"HF_HUB_OFFLINE": "1"})  # as pods of non-Hub runs have it
    assert TRUST_CHECK not in output and "kernels-community" not in output


def test_a_stage_with_a_local_model_and_tokenizer_asks_the_hub_nothing(
    assets: Assets, tmp_path: Path, hub_requests: tuple[str, list[str]]
) -> None:
    endpoint, requests = hub_requests
    output = _train(assets, tmp_path, {"HF_ENDPOINT": endpoint})  # and HF_HUB_OFFLINE unset
    assert requests == [], f"the stage asked the Hub: {requests}\n{output[-2000:]}"
