"""Checkpoints and the final model go to S3 in the background; failures are retried and counted;
a restarted pod with an empty disk resumes from the newest complete checkpoint in the bucket; two
nodes each upload their own part and only then does `COMPLETE` appear.

Real: a `moto_server` S3 endpoint over HTTP (tests/conftest.py), boto3, the train stage in its own
process (forked from a warm interpreter, tests/support/trainer_support.py) with its metrics endpoint
scraped over HTTP; for two nodes, two `torchrun --nnodes 2` launches with separate work
directories, as two pods would be. The upload failure is real too: the bucket does not exist until
the test has seen the first failed attempt counted, then it creates it and the retry succeeds.
Emulated: two nodes are two process trees on one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from ports import free_port
from trainer_support import (
    ENV,
    ROOT,
    Assets,
    Launcher,
    result,
    resumed_step,
    train_config,
    write_config,
)

pytestmark = pytest.mark.slow


def _failures(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "kubetrain_checkpoint_upload_failures_total":
                return sample.value
    return 0.0


def test_uploads_retry_and_a_fresh_pod_resumes_from_s3(
    assets: Assets, moto_endpoint: str, launcher: Launcher, tmp_path: Path
) -> None:
    s3 = S3Settings(endpoint=moto_endpoint, region="us-east-1", allow_insecure_endpoint=True)
    bucket = f"late-{uuid.uuid4().hex[:10]}"
    output = f"s3://{bucket}/runs/r1"
    env = {
        k: os.environ[k]
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    port = free_port()
    config = write_config(
        tmp_path / "train.json",
        train_config(
            assets.text(),
            output,
            training={"maxSteps": 40},
            checkpoints={"everySteps": 10, "keep": 2},
            metricsPort=port,
            s3={"endpoint": moto_endpoint, "region": "us-east-1", "allowInsecureEndpoint": True},
        ),
    )
    child = launcher.start("train", config, tmp_path / "pod-1", env=env)
    child.wait_for(lambda: _failures(port) >= 1, timeout=120, poll=0.05)
    storage.client(s3).create_bucket(Bucket=bucket)
    assert child.wait() == 0, child.output()[-3000:]
    assert "upload attempt 1 failed" in child.output()

    objects = {rel for rel, _, _ in storage.list_objects(output, s3)}
    complete = sorted(
        rel.split("/")[1]
        for rel in objects
        if rel.startswith("checkpoints/") and rel.endswith("/COMPLETE")
    )
    # The newest is there; older ones either waited behind the retried upload and were
    # superseded, or were rotated out: never more than `keep`.
    assert complete[-1] == "step-00000040" and len(complete) <= 2, complete
    assert {
        "checkpoints/step-00000040/NODE-0.json",
        "checkpoints/step-00000040/optimizer.pt",
    } <= objects
    assert {"final/COMPLETE", "final/model.safetensors", "final/tokenizer.json"} <= objects
    assert result(tmp_path / "pod-1")["outputs"]["final"] == f"{output}/final"

    # A new pod: empty workdir, same output; it must continue from the bucket's step 40.
    more = write_config(
        tmp_path / "more.json",
        train_config(
            assets.text(),
            output,
            training={"maxSteps": 45},
            checkpoints={"everySteps": 10, "keep": 2},
            s3={"endpoint": moto_endpoint, "region": "us-east-1", "allowInsecureEndpoint": True},
        ),
    )
    child = launcher.start("train", more, tmp_path / "pod-2", env=env)
    assert child.wait() == 0, child.output()[-3000:]
    assert resumed_step(child.output()) == 40
    assert result(tmp_path / "pod-2")["resumedFrom"] == 40
    assert (tmp_path / "pod-2" / "train-checkpoints" / "step-00000040" / "COMPLETE").exists()


def test_two_nodes_upload_their_parts_and_resume_from_the_bucket(
    assets: Assets, moto_endpoint: str, tmp_path: Path
) -> None:
    s3 = {"endpoint": moto_endpoint, "region": "us-east-1", "allowInsecureEndpoint": True}
    bucket = f"nodes-{uuid.uuid4().hex[:10]}"
    storage.client(S3Settings(**s3)).create_bucket(Bucket=bucket)
    output = f"s3://{bucket}/run"

    def two_nodes(steps: int, attempt: str) -> list[Path]:
        config = write_config(
            tmp_path / f"{attempt}.json",
            train_config(
                assets.text(),
                output,
                training={"maxSteps": steps},
                checkpoints={"everySteps": 5, "keep": 2},
                distributed={"worldSize": 2},
                s3=s3,
            ),
        )
        port, workdirs, procs = free_port(), [], []
        for node in (0, 1):
            workdirs.append(tmp_path / f"{attempt}-node{node}")
            command = [
                str(Path(sys.executable).parent / "torchrun"),
                *("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"),
                *("--master_addr", "127.0.0.1", "--master_port", str(port)),
                *("-m", "kubetrain_trainer", "train", "--config", str(config)),
                *("--workdir", str(workdirs[-1])),
            ]
            log = (tmp_path / f"{attempt}-{node}.log").open("w")
            env = {**os.environ, **ENV}
            procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log))
        codes = [proc.wait(timeout=600) for proc in procs]
        assert codes == [0, 0], (tmp_path / f"{attempt}-0.log").read_text()[-3000:]
        return workdirs

    two_nodes(5, "first")
    step = f"checkpoints/{'step-00000005'}"
    objects = {rel for rel, _, _ in storage.list_objects(output, S3Settings(**s3))}
    # Each node's own files (the other rank's RNG state lives only on node 1) and its marker.
    assert {f"{step}/rng_state_0.pth", f"{step}/rng_state_1.pth"} <= objects
    assert {f"{step}/NODE-0.json", f"{step}/NODE-1.json", f"{step}/COMPLETE"} <= objects

    workdirs = two_nodes(6, "again")  # new pods: empty work directories
    for workdir in workdirs:
        assert (workdir / "train-checkpoints" / "step-00000005" / "rng_state_1.pth").exists()
    assert result(workdirs[0])["resumedFrom"] == 5 and result(workdirs[0])["step"] == 6
