"""Rendering the Helm chart with real Helm (helm-python-sdk embeds Helm v4) for the chart tests."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
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


def stage_pod_templates(example: str, directory: Path, nodes: int = 1) -> list[dict[str, Any]]:
    """The pod templates of an example's stages on `nodes` nodes, as `kubetrain render` renders
    them (the real CLI): what the chart's PodMonitor, NetworkPolicy and alerts must match."""
    doc = yaml.safe_load((ROOT / "examples" / example).read_text())
    doc["spec"]["resources"]["nodes"] = nodes
    path = directory / example
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetrain_operator.cli", "render", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    templates: list[dict[str, Any]] = []
    for obj in yaml.safe_load_all(proc.stdout):
        if obj and obj["kind"] == "Job":
            templates.append(obj["spec"]["template"])
        elif obj and obj["kind"] == "PyTorchJob":
            templates += [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return templates
