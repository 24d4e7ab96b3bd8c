"""`python -m standin --port PORT --workdir DIR`: a local cluster stand-in, until Ctrl-C.

Writes DIR/kubeconfig and prints its path when ready. Then, for example:
    KUBECONFIG=DIR/kubeconfig kubectl apply -f crds/
    KUBECONFIG=DIR/kubeconfig KUBETRAIN_METRICS_ENDPOINTS=DIR/service-endpoints.json \
        kubetrain operator
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
        async with serve(workdir, args.port, pods=not args.no_pods) as (_, url, _runner):
            path = write_kubeconfig(workdir, url)
            print(path, flush=True)
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
