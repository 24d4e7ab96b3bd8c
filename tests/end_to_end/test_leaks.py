"""No credential leaks: a whole local pipeline with planted credentials, then every file it wrote
(logs, results, stage configs, manifest, model cards, metrics) and every rendered manifest
(ConfigMaps, Jobs, PyTorchJobs) is scanned for them.

Real: the `kubetrain` CLI (`run` and `render`) as subprocesses, the real preprocess, train and
merge stages, with AWS and Hugging Face credentials in their environment as a pod gets them from
its Secrets, and the run naming those Secrets (`storage.s3.secretName`, `storage.hf.secretName`).
Emulated: nothing — the credentials are planted strings, never used against a real service.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBETRAIN = [sys.executable, "-m", "kubetrain_operator.cli"]
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEY7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "plantedSecretKey/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "plantedSessionTokenFwoGZXIvYXdzEXAMPLE",
    "HF_TOKEN": "hf_plantedTokenAbCdEfGhIjKlMnOpQrStUv",
}

pytestmark = pytest.mark.slow


def test_no_credential_reaches_any_output(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "tinystories-cpu.yaml").read_text())
    doc["spec"]["data"]["train"] = [str(ROOT / "examples" / "data" / "tinystories-cpu.txt")]
    doc["spec"]["training"].update({"maxSteps": 8, "loggingSteps": 2})
    doc["spec"]["checkpoints"] = {"everySteps": 4, "keep": 2}
    doc["spec"].pop("sanity", None)
    doc["spec"]["output"] = {"uri": str(tmp_path / "output")}
    doc["spec"]["storage"] = {
        "s3": {"secretName": "training-s3"},
        "hf": {"secretName": "hub-token"},
    }
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **PLANTED}
    workdir = tmp_path / "work"
    run = subprocess.run(
        [*KUBETRAIN, "run", str(spec), "--workdir", str(workdir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The same run as a cluster would get it (pods read volumes or buckets, not local paths).
    doc["spec"]["data"]["train"] = ["pvc://data/tinystories-cpu.txt"]
    doc["spec"]["output"] = {"uri": "s3://runs/tinystories"}
    cluster = tmp_path / "cluster-run.yaml"
    cluster.write_text(yaml.safe_dump(doc))
    render = subprocess.run(
        [*KUBETRAIN, "render", str(cluster)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert render.returncode == 0, render.stderr[-3000:]
    assert "kind: ConfigMap" in render.stdout and "secretKeyRef" in render.stdout

    scanned = {
        "kubetrain run (console)": run.stdout + run.stderr,
        "kubetrain render": render.stdout,
    }
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and path.suffix not in (".safetensors", ".arrow", ".pt", ".pth", ".bin"):
            scanned[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    kinds = {Path(name).name for name in scanned}
    # What the scan must have covered: logs, results, configs, manifest, model cards.
    for expected in ("train.log", "result-train.json", "train.json", "manifest.json", "README.md"):
        assert expected in kinds, expected
    hits = [
        (name, var)
        for name, text in scanned.items()
        for var, secret in PLANTED.items()
        if secret in text
    ]
    assert hits == []
