"""Writes the chart's generated files from their one source each (`make chart`).

    python observability/generate.py          # write them
    python observability/generate.py --check  # exit 1 naming each stale file (the tests do this)

- templates/crd-trainingruns.yaml  ← crds/trainingruns.kubetrain.dev.yaml (`kubetrain crd`)
- templates/_rbac_rules.tpl        ← operator/kubetrain_operator/permissions.py
- files/dashboard.json             ← observability/dashboard.py
- files/argocd-health.lua, files/flux-health-check-exprs.yaml ← observability/

A Helm chart can read nothing outside its own directory, hence copies; each is compared with its
source by the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from kubetrain_operator.permissions import CLUSTER_RULES, NAMESPACED_RULES, Rule

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "observability"
CHART = ROOT / "charts" / "kubetrain"
CRD_SOURCE = ROOT / "crds" / "trainingruns.kubetrain.dev.yaml"
CRD_NAME_LINE = "  name: trainingruns.kubetrain.dev\n"
COPIED = ("argocd-health.lua", "flux-health-check-exprs.yaml")


def crd_template() -> str:
    """The CRD as a template: installed and upgraded with the release, kept on uninstall."""
    source = CRD_SOURCE.read_text()
    head, sep, body = source.partition(CRD_NAME_LINE)
    if not sep:
        raise SystemExit(f"{CRD_SOURCE}: no line {CRD_NAME_LINE.strip()!r} to annotate")
    header = [line for line in head.splitlines(keepends=True) if line.startswith("#")]
    manifest = "".join(line for line in head.splitlines(keepends=True) if line not in header)
    return (
        "{{- if .Values.crds.enabled }}\n"
        "# Generated from crds/trainingruns.kubetrain.dev.yaml by observability/generate.py\n"
        "# (make crd): do not edit. In templates/, not crds/, so that `helm upgrade` upgrades it.\n"
        f"{manifest}{CRD_NAME_LINE}"
        "  {{- if .Values.crds.keep }}\n"
        "  annotations:\n"
        "    # Deleting the CRD would delete every TrainingRun in the cluster.\n"
        "    helm.sh/resource-policy: keep\n"
        "  {{- end }}\n"
        f"{body}"
        "{{- end }}\n"
    )


def _rules_yaml(rules: Iterable[Rule]) -> str:
    lines = []
    for rule in rules:
        lines += [
            f"# {rule.scope}: {rule.why}",
            f"- apiGroups: [{json.dumps(rule.api_group)}]",
            f"  resources: {json.dumps(list(rule.resources))}",
            f"  verbs: {json.dumps(list(rule.verbs))}",
        ]
    return "\n".join(lines)


def rbac_template() -> str:
    """Named templates with the rules, each commented with its scope and reason."""
    return (
        "{{/* Generated from operator/kubetrain_operator/permissions.py by"
        " observability/generate.py (make chart): do not edit. */}}\n"
        '{{- define "kubetrain.clusterRules" }}\n'
        f"{_rules_yaml(CLUSTER_RULES)}\n"
        "{{- end }}\n"
        '{{- define "kubetrain.namespacedRules" }}\n'
        f"{_rules_yaml(NAMESPACED_RULES)}\n"
        "{{- end }}\n"
    )


def generated() -> dict[Path, str]:
    """Every generated file's path and the text it must hold."""
    sys.path.insert(0, str(HERE))
    import dashboard

    files = {
        CHART / "templates" / "crd-trainingruns.yaml": crd_template(),
        CHART / "templates" / "_rbac_rules.tpl": rbac_template(),
        CHART / "files" / "dashboard.json": dashboard.render(),
    }
    files.update({CHART / "files" / name: (HERE / name).read_text() for name in COPIED})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on stale files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT))
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path} is stale: run `make chart` and commit", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
