"""Rendering the Helm chart with real Helm (helm-python-sdk embeds Helm v4) for the chart tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetrain"
RELEASE, NAMESPACE = "kubetrain", "kubetrain-system"

#: Everything optional switched on, namespaced: the widest rendering.
EVERYTHING: dict[str, Any] = {
    "operator": {
        "watchNamespaces": ["team-a", "team-b"],
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "networkPolicy": {"enabled": True},
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
    "gitops": {"healthChecksConfigMap": True},
    "kubeflow": {"initContainerTemplate": {"enabled": True}},
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults (cluster-wide)": {},
    "namespaced": {"operator": {"watchNamespaces": ["ml", "research"]}},
    "no CRDs": {"crds": {"enabled": False}},
    "NetworkPolicy on": {"networkPolicy": {"enabled": True}},
    "everything on": EVERYTHING,
}


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (YAML keeps the last one silently; so does kubectl)."""


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {sorted(duplicates)}", node.start_mark
        )
    return loader.construct_mapping(node)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _unique_mapping,  # type: ignore[arg-type]
)


@cache
def chart() -> Any:
    import helm_python as helm

    return helm.Chart.load(CHART)


def render_text(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path → rendered text, as `helm template` would print it."""
    return chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rendered object (NOTES.txt excluded)."""
    objects = []
    for path, text in sorted(render_text(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.load_all(text, Loader=UniqueKeyLoader) if doc]
    return objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def prometheus_rules(**settings: Any) -> dict[str, Any]:
    """The PrometheusRule's spec: a Prometheus rule file (`groups:`) as promtool reads it."""
    values = {"metrics": {"prometheusRule": {"enabled": True, **settings}}}
    (rule,) = of_kind(render(values), "PrometheusRule")
    return rule["spec"]
