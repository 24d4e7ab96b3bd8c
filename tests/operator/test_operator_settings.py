"""The operator's settings from its environment: the cluster defaults the chart passes.

Real: `OperatorSettings.from_env` and `ClusterDefaults` validation, over a real process
environment (monkeypatched variables), and the real `kopf run` process refusing a bad value.
Nothing is emulated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetrain_operator.cluster_defaults import NO_DEFAULTS
from kubetrain_operator.settings import CLUSTER_ENV, ENVIRONMENT, OperatorSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def test_unset_and_empty_variables_keep_the_built_in_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert OperatorSettings.from_env().defaults == NO_DEFAULTS
    for name in CLUSTER_ENV.values():
        monkeypatch.setenv(name, "")
    assert OperatorSettings.from_env().defaults == NO_DEFAULTS


def test_every_cluster_default_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "KUBETRAIN_TRAINER_IMAGE": "registry.example/trainer:2.0",
        "KUBETRAIN_TRAINER_SERVICE_ACCOUNT": "kubetrain-trainer",
        "KUBETRAIN_IMAGE_PULL_SECRETS": "regcred, mirror ,",
        "KUBETRAIN_TRAINER_METRICS_PORT": "9500",
        "KUBETRAIN_CACHE_ROOT": "pvc://cache/datasets",
        "KUBETRAIN_S3_ENDPOINT": "http://minio.storage:9000",
        "KUBETRAIN_S3_ALLOW_INSECURE_ENDPOINT": "true",
        "KUBETRAIN_S3_SECRET_NAME": "s3-credentials",
        "KUBETRAIN_GPU_MEMORY": "80Gi",
    }
    assert set(values) == set(CLUSTER_ENV.values())
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    defaults = OperatorSettings.from_env().defaults
    assert defaults.trainer_image == "registry.example/trainer:2.0"
    assert defaults.trainer_service_account == "kubetrain-trainer"
    assert defaults.image_pull_secrets == ("regcred", "mirror")
    assert defaults.metrics_port == 9500
    assert defaults.cache_root == "pvc://cache/datasets"
    assert defaults.s3_endpoint == "http://minio.storage:9000"
    assert defaults.s3_allow_insecure_endpoint is True
    assert defaults.s3_secret_name == "s3-credentials"
    assert defaults.gpu_memory == "80Gi"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KUBETRAIN_TRAINER_IMAGE": "trainer:1 ; curl x"}, "KUBETRAIN_TRAINER_IMAGE='trainer"),
        ({"KUBETRAIN_TRAINER_SERVICE_ACCOUNT": "Trainer_SA"}, "KUBETRAIN_TRAINER_SERVICE_ACCOUNT="),
        ({"KUBETRAIN_IMAGE_PULL_SECRETS": "ok,not ok"}, "KUBETRAIN_IMAGE_PULL_SECRETS='ok,not ok'"),
        ({"KUBETRAIN_TRAINER_METRICS_PORT": "http"}, "KUBETRAIN_TRAINER_METRICS_PORT='http'"),
        ({"KUBETRAIN_TRAINER_METRICS_PORT": "0"}, "greater than or equal to 1"),
        ({"KUBETRAIN_CACHE_ROOT": "/srv/cache"}, "KUBETRAIN_CACHE_ROOT='/srv/cache': a pod cannot"),
        ({"KUBETRAIN_S3_ENDPOINT": "http://minio:9000"}, "KUBETRAIN_S3_ENDPOINT="),
        ({"KUBETRAIN_S3_ENDPOINT": "https://k:s@minio"}, "KUBETRAIN_S3_ENDPOINT="),
        ({"KUBETRAIN_S3_ALLOW_INSECURE_ENDPOINT": "yes"}, "expected true or false"),
        ({"KUBETRAIN_S3_SECRET_NAME": "S3"}, "KUBETRAIN_S3_SECRET_NAME='S3'"),
        ({"KUBETRAIN_RESYNC_SECONDS": "soon"}, "KUBETRAIN_RESYNC_SECONDS='soon'"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_a_bad_value_stops_the_operator_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        OperatorSettings.from_env()
    assert expected in str(stopped.value)


def test_a_plain_http_endpoint_needs_the_explicit_allowance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBETRAIN_S3_ENDPOINT", "http://minio:9000")
    with pytest.raises(SystemExit, match="is plain http"):
        OperatorSettings.from_env()
    monkeypatch.setenv("KUBETRAIN_S3_ALLOW_INSECURE_ENDPOINT", "false")
    with pytest.raises(SystemExit, match="is plain http"):
        OperatorSettings.from_env()
    monkeypatch.setenv("KUBETRAIN_S3_ALLOW_INSECURE_ENDPOINT", "TRUE")
    assert OperatorSettings.from_env().defaults.s3_endpoint == "http://minio:9000"


@pytest.mark.slow  # starts a stage or operator process
def test_the_operator_process_refuses_to_start_with_a_bad_default(tmp_path: Path) -> None:
    """`kopf run -m kubetrain_operator.main` (as the chart starts it) exits before it connects."""
    proc = subprocess.run(
        [sys.executable, "-m", "kopf", "run", "--standalone", "-m", "kubetrain_operator.main"],
        env={
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "operator"),
            "KUBECONFIG": str(tmp_path / "none"),
            "KUBETRAIN_CACHE_ROOT": "/srv/cache",
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "KUBETRAIN_CACHE_ROOT='/srv/cache': a pod cannot reach a local path" in proc.stderr
