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
)

#: Rules granted in every watched namespace (Role per namespace, or a ClusterRole cluster-wide).
NAMESPACED_RULES: tuple[Rule, ...] = (
    Rule(
        "kubetrain.dev",
        ("trainingruns",),
        ("get", "list", "watch", "patch"),
        "framework",
        "Kopf watches runs and patches its finalizer and progress annotations on them",
    ),
    Rule(
        "kubetrain.dev",
        ("trainingruns/status",),
        ("get", "patch"),
        "application",
        "status: conditions, progress, attempts, outputs",
    ),
    Rule(
        "",
        ("events",),
        ("create",),
        "framework",
        "Kopf posts an event per handler outcome and per condition transition",
    ),
    Rule(
        "events.k8s.io",
        ("events",),
        ("create",),
        "framework",
        "the same events through the events.k8s.io API",
    ),
)
