"""Every API call the operator makes, as RBAC rules — the one list the chart renders.

`k8s` is the only module that talks to the API server, and it may only call what is listed here;
the chart's Role/ClusterRole is rendered from this list and a test compares the two. "framework"
rules are what Kopf itself needs (watching the resource, posting events, discovering CRDs);
"application" rules are what our handlers do with children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["framework", "application"]


@dataclass(frozen=True)
class Rule:
    """One RBAC rule with the reason it exists."""

    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    scope: Scope
    why: str


#: Rules that only make sense cluster-wide (a ClusterRole even when the operator is namespaced).
CLUSTER_RULES: tuple[Rule, ...] = (
    Rule(
        "apiextensions.k8s.io",
        ("customresourcedefinitions",),
        ("list", "watch"),
        "framework",
        "Kopf discovers the TrainingRun CRD and notices when it is added or removed",
    ),
    Rule(
        "",
        ("namespaces",),
        ("list", "watch"),
        "framework",
        "with --namespace, Kopf's namespace observer lists and watches namespaces",
    ),
)

#: Rules granted in every watched namespace (Role per namespace, or a ClusterRole cluster-wide).
NAMESPACED_RULES: tuple[Rule, ...] = (
    Rule(
        "kubetrain.dev",
        ("trainingruns",),
        ("list", "watch", "patch"),
        "framework",
        "Kopf watches (indexes) runs and patches its finalizer on them",
    ),
    Rule(
        "kubetrain.dev",
        ("trainingruns/status",),
        ("patch",),
        "application",
        "k8s.Cluster.patch_status: conditions, progress, attempts, outputs",
    ),
    Rule(
        "",
        ("events",),
        ("create",),
        "framework",
        "Kopf posts the events k8s.post_event queues (one per condition transition, attempt)",
    ),
    Rule(
        "batch",
        ("jobs",),
        ("list", "watch"),
        "application",
        "handlers.run_jobs index (which pokes the run): the preprocess and merge Jobs' status",
    ),
    Rule(
        "batch",
        ("jobs",),
        ("create", "patch", "delete"),
        "application",
        "k8s.Cluster.create (stage Jobs), set_suspend (spec.suspend), delete (a preprocess stall)",
    ),
    Rule(
        "kubeflow.org",
        ("pytorchjobs",),
        ("list", "watch"),
        "application",
        "handlers.run_pytorchjobs index (which pokes the run): sanity and training jobs' status",
    ),
    Rule(
        "kubeflow.org",
        ("pytorchjobs",),
        ("create", "patch", "delete"),
        "application",
        "k8s.Cluster.create (attempts), set_suspend (runPolicy.suspend), delete (stall, failure)",
    ),
    Rule(
        "",
        ("pods",),
        ("list", "watch"),
        "application",
        "handlers.run_pods index: exit codes, termination messages, pods still running",
    ),
    Rule(
        "",
        ("configmaps",),
        ("create", "patch"),
        "application",
        "k8s.Cluster.create / update_data: the run's stage configs (kept current for attempts)",
    ),
    Rule(
        "",
        ("services",),
        ("create",),
        "application",
        "k8s.Cluster.create: the run's metrics Service (progress polling, PodMonitor)",
    ),
    Rule(
        "",
        ("serviceaccounts",),
        ("create",),
        "application",
        "k8s.Cluster.create: the trainer ServiceAccount where a run starts and it is missing "
        "(no Role binds it; stage pods never mount its token)",
    ),
)
