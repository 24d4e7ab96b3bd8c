"""Starting the stand-in: in a test (a background thread with its own event loop) or as a command.

    with start_apiserver(tmp_path) as cluster:        # API server only
        env = {"KUBECONFIG": str(cluster.kubeconfig)}
        ...cluster.calls()                             # every request, as RBAC classifies it

    with start_cluster(tmp_path) as cluster:          # plus the pod runner and controllers
        ...

Both write `<workdir>/kubeconfig` (context `standin`, namespace `default`, plain HTTP on
127.0.0.1, no credentials: the stand-in does no authentication).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from .apiserver import Call, StandInAPIServer

CRDS = Path(__file__).parent / "crds"
T = TypeVar("T")


@dataclass
class StandIn:
    """A running stand-in: its URL, kubeconfig and the server object (same process)."""

    url: str
    kubeconfig: Path
    workdir: Path
    server: StandInAPIServer
    loop: asyncio.AbstractEventLoop
    runner: Any = None  # the pod runner (pods.PodRunner) when started with pods

    def run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        """Run a coroutine on the stand-in's loop from another thread (tests)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def calls(self) -> list[Call]:
        return self.server.calls()

    def objects(
        self, group: str, plural: str, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self.server.objects(group, plural, namespace)

    def get(
        self, group: str, plural: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        return self.server.get(group, plural, namespace, name)

    @property
    def env(self) -> dict[str, str]:
        """Environment for kubectl/Kopf/kubetrain processes: this kubeconfig, a private cache."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.workdir / "kubectl-cache"),
        }


def initial_crds() -> list[dict[str, Any]]:
    """The CRDs a cluster with the Kubeflow training operator installed already has."""
    found = []
    for path in sorted(CRDS.glob("*.yaml")):
        # libyaml: the PyTorchJob CRD is 600 kB (1.1 s with the pure-Python loader)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        found += [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]
    return found


def write_kubeconfig(workdir: Path, url: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "standin", "user": {}}],
        "contexts": [
            {
                "name": "standin",
                "context": {"cluster": "standin", "user": "standin", "namespace": "default"},
            }
        ],
        "current-context": "standin",
    }
    path = workdir / "kubeconfig"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def serve(
    workdir: Path, port: int = 0, *, pods: bool = False, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[StandInAPIServer, str, Any]]:
    """Run the stand-in on the current loop: yields (server, url, pod runner or None)."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = StandInAPIServer()
    for crd in initial_crds():
        server.register_crd_sync(crd)
    async with server, kmock.Server(server, host=host, port=port or None) as http:
        server.address = f"{host}:{http.port}"
        url = f"http://{host}:{http.port}"
        gc = asyncio.create_task(server.run_garbage_collector())
        runner = None
        if pods:
            from .pods import PodRunner

            runner = PodRunner(server, workdir)
            await runner.start()
        try:
            yield server, url, runner
        finally:
            if runner is not None:
                await runner.stop()
            gc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gc


@contextlib.contextmanager
def _threaded(workdir: Path, port: int, pods: bool) -> Iterator[StandIn]:
    ready: concurrent.futures.Future[StandIn] = concurrent.futures.Future()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with serve(workdir, port, pods=pods) as (server, url, runner):
                kubeconfig = write_kubeconfig(workdir, url)
                ready.set_result(StandIn(url, kubeconfig, workdir, server, loop, runner))
                await stop.wait()
        except BaseException as error:
            if not ready.done():
                ready.set_exception(error)
            raise

    thread = threading.Thread(
        target=lambda: loop.run_until_complete(main()), name="standin", daemon=True
    )
    thread.start()
    standin = ready.result(timeout=60)
    try:
        yield standin
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=60)
        loop.close()


def start_apiserver(workdir: Path, port: int = 0) -> contextlib.AbstractContextManager[StandIn]:
    """The API server stand-in alone (no pods run): for wiring tests of the operator."""
    return _threaded(Path(workdir), port, pods=False)


def start_cluster(workdir: Path, port: int = 0) -> contextlib.AbstractContextManager[StandIn]:
    """The API server plus the kubelet, Job controller and training-operator stand-ins."""
    return _threaded(Path(workdir), port, pods=True)
