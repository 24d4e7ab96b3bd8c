"""A local cluster stand-in for tests and trying the operator without a cluster.

See docs/standin.md for what it emulates and what not, and `cluster.py` for the Python API:
`start_apiserver(workdir)` / `start_cluster(workdir)` yield a `StandIn` (url, kubeconfig, env,
calls(), objects()). `python -m standin --port PORT --workdir DIR` runs the same thing as a
command. Test tooling only: nothing here ships in the product.
"""

from .apiserver import Call, StandInAPIServer
from .cluster import StandIn, serve, start_apiserver, start_cluster, write_kubeconfig

__all__ = [
    "Call",
    "StandIn",
    "StandInAPIServer",
    "serve",
    "start_apiserver",
    "start_cluster",
    "write_kubeconfig",
]
