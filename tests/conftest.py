"""Shared fixtures, and what makes a test slow. Real servers only: S3 is a real `moto_server`
over HTTP on 127.0.0.1.

The trainer tests share one set of assets (datasets, the tiny base model) and one warm launcher for
the whole session; both come from tests/support/trainer_support.py, imported only when a test asks
for them.

`make check` runs what is not slow. A test is slow, without anyone remembering a marker, when it
lives in a folder that runs the stand-in or whole pipelines, or uses a fixture that trains or
starts a process or server (`SLOW_FOLDERS`, `SLOW_FIXTURES`). Anything else that starts a process
is caught in a run that deselects slow tests (`make check`): the test fails and says how to mark
it. Short-lived, pure commands (`kubetrain` but `run` and `operator`, git, Helm, promtool, the
chart generator) stay in the fast loop: they read files and exit within a second.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
#: Folders whose every test runs the stand-in or a whole pipeline of processes.
SLOW_FOLDERS = (ROOT / "tests" / "end_to_end", ROOT / "tests" / "standin")
#: Fixtures that train or start a process or server: a test that uses one (directly or through
#: another fixture) is slow.
SLOW_FIXTURES = frozenset({"assets", "launcher", "moto_endpoint"})
#: Short-lived, pure commands a fast test may run: they read files and exit within a second.
QUICK_PROGRAMS = frozenset({"git", "helm", "promtool", "generate.py"})
#: `kubetrain` subcommands that start stages or the operator: every other one is quick.
SLOW_SUBCOMMANDS = frozenset({"run", "operator"})

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
        if item.get_closest_marker("e2e"):
            item.add_marker(skip)


def _quick(argv: Any) -> bool:
    """QUICK_PROGRAMS, or `kubetrain` (or `python -m kubetrain_operator.cli`) but run/operator."""
    if isinstance(argv, (str, bytes, os.PathLike)) or not isinstance(argv, Sequence) or not argv:
        return False
    words = [os.path.basename(str(word)) for word in argv]
    if words[1:3] == ["-m", "kubetrain_operator.cli"]:
        words = ["kubetrain", *words[3:]]
    elif words[0].startswith("python") and len(words) > 1:
        words = words[1:]  # a script: python generate.py
    if words[0] == "kubetrain":
        return "--help" in words or not SLOW_SUBCOMMANDS.intersection(words[1:2])
    return words[0] in QUICK_PROGRAMS


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """In a run without slow tests, a test not marked slow starts no process but a quick one."""
    fast_run = "not slow" in (item.config.getoption("markexpr") or "")
    guarded = fast_run and item.get_closest_marker("slow") is None
    with _no_processes(item) if guarded else contextlib.nullcontext():
        return (yield)


@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[None]:
    """subprocess.Popen (so subprocess.run), os.fork and multiprocessing's start fail the test
    while it is set up, runs and is torn down; quick commands pass."""

    def refuse(what: str) -> None:
        pytest.fail(
            f"{item.nodeid} starts a process ({what}) but is not marked slow, and `make check` "
            "runs only fast tests: use a fixture in SLOW_FIXTURES (tests/conftest.py), add the "
            "fixture that starts it there, or mark the test or its module `pytest.mark.slow`.",
            pytrace=False,
        )

    popen_init, fork, start = (
        subprocess.Popen.__init__,
        os.fork,
        multiprocessing.process.BaseProcess.start,
    )

    def guarded_popen(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if not _quick(args):
            refuse(f"{args!r:.80}")
        popen_init(self, args, *rest, **kwargs)

    def guarded_fork() -> int:
        refuse("os.fork")
        return fork()

    def guarded_start(self: multiprocessing.process.BaseProcess) -> None:
        refuse("multiprocessing")
        start(self)

    subprocess.Popen.__init__ = guarded_popen  # type: ignore[assignment,method-assign]
    os.fork = guarded_fork
    multiprocessing.process.BaseProcess.start = guarded_start  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
        os.fork = fork
        multiprocessing.process.BaseProcess.start = start  # type: ignore[method-assign]
