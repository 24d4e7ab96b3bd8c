"""Shared fixtures, and what makes a test slow. Real servers only: S3 is a real `moto_server`
over HTTP on 127.0.0.1.

The trainer tests share one set of assets (datasets, the tiny base model) and one warm launcher for
the whole session; both come from tests/support/trainer_support.py, imported only when a test asks
for them.

`make check` runs what is not slow. A test is slow, without anyone remembering a marker, when it
lives in a folder that runs the stand-in or whole pipelines, or uses a fixture that trains or
starts a process or server (`SLOW_FOLDERS`, `SLOW_FIXTURES`); other modules that start
processes say so with `pytestmark = pytest.mark.slow`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
#: Folders whose every test runs the stand-in or a whole pipeline of processes.
SLOW_FOLDERS = (ROOT / "tests" / "end_to_end", ROOT / "tests" / "standin")
#: Fixtures that train or start a process or server: a test that uses one (directly or through
#: another fixture) is slow.
SLOW_FIXTURES = frozenset({"assets", "launcher", "moto_endpoint"})

if TYPE_CHECKING:
    from trainer_support import Assets, Launcher


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 HTTP endpoint (moto_server), with dummy credentials exported for boto3."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    old = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Datasets and models the trainer tests train on, built on first use and kept on disk."""
    from trainer_support import Assets

    return Assets(tmp_path_factory.getbasetemp() / "trainer-assets")


@pytest.fixture(scope="session")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """One warm launcher for the whole session: its import cost is paid once."""
    from trainer_support import Launcher

    warm = Launcher(tmp_path_factory.getbasetemp() / "launcher-logs")
    yield warm
    warm.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    """The opt-in real-cluster e2e suite (docs/standin.md): `pytest --kube-context NAME -m e2e`."""
    group = parser.getgroup("e2e", "real-cluster end-to-end tests")
    group.addoption(
        "--kube-context",
        default=None,
        help="kubeconfig context of a cluster with the Kubeflow training operator",
    )
    group.addoption(
        "--e2e-image",
        default=None,
        help="trainer image the e2e runs use (spec.image); default: the operator's",
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        in_folder = any(item.path.is_relative_to(folder) for folder in SLOW_FOLDERS)
        if in_folder or SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--kube-context"):
        return
    skip = pytest.mark.skip(
        reason="needs a real cluster: pytest --kube-context NAME -m e2e (see docs/standin.md)"
    )
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
