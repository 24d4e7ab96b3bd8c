"""`python -m standin --port PORT --workdir DIR`: a local cluster stand-in, until Ctrl-C.

Writes DIR/kubeconfig and, when ready, prints its path, then the `export` line that points
kubectl and `kubetrain operator` at it in another shell (the README's tour shows the same line):
    export KUBECONFIG=DIR/kubeconfig KUBETRAIN_METRICS_ENDPOINTS=DIR/service-endpoints.json
The second variable is where the operator finds the trainers' metrics Services: the host cannot
resolve cluster DNS names, so the stand-in keeps that file of `namespace/service` → URL.
Pods run as local processes with the project's .venv (needs root: mount namespaces);
PVC NAME is the directory DIR/pvcs/NAME. What is emulated and what not: docs/standin.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path

from .cluster import serve, write_kubeconfig


def export_line(kubeconfig: Path, endpoints: Path | None) -> str:
    """The shell line that points kubectl and the operator at this stand-in (docs/standin.md)."""
    line = f"export KUBECONFIG={kubeconfig}"
    return line + (f" KUBETRAIN_METRICS_ENDPOINTS={endpoints}" if endpoints else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m standin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument(
        "--workdir",
        type=Path,
        required=True,
        help="kubeconfig, pods' files and PVC directories go here",
    )
    parser.add_argument(
        "--no-pods", action="store_true", help="the API server only: no kubelet or controllers"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="warnings only: no line per request (benchmarks)"
    )
    args = parser.parse_args(argv)
    # As the operator (kubetrain_operator.main.GC_THRESHOLDS): the store holds every object, and
    # the collector's passes over it at the default thresholds were a third of the server's CPU.
    gc.set_threshold(50_000, 20, 10)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
    )

    async def run() -> None:
        workdir = args.workdir.resolve()
        async with serve(workdir, args.port, pods=not args.no_pods) as (_, url, runner):
            path = write_kubeconfig(workdir, url)
            print(path, flush=True)
            print(export_line(path, runner.endpoints_file if runner else None), flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
