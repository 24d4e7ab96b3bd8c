"""The Helm chart, rendered and linted by real Helm (helm-python-sdk embeds Helm v4).

Real: Helm's loader, template engine, `lint --strict` and values.schema.json validation; every
core object is checked by kubernetes-validate --strict (the Kubernetes OpenAPI schemas); RBAC is
compared with operator/kubetrain_operator/permissions.py; pods against Pod Security "restricted"
(tests/operator/test_render.py's rule-by-rule check). Not real: no API server installs the release
(none runs here), and the monitoring.coreos.com kinds have no bundled schema — their PrometheusRule
is checked by promtool (tests/chart/test_alerts.py), ServiceMonitor/PodMonitor by their fields here.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from chart_support import (
    CHART,
    EVERYTHING,
    NAMESPACE,
    ROOT,
    VALUE_SETS,
    chart,
    named,
    of_kind,
    render,
    render_text,
    stage_pod_templates,
)
from kubetrain_operator.cluster_defaults import NO_DEFAULTS
from kubetrain_operator.permissions import CLUSTER_RULES, NAMESPACED_RULES, Rule
from kubetrain_operator.settings import ENVIRONMENT, OperatorSettings
from pod_security import restricted_violations

#: The chart's minimum (Chart.yaml kubeVersion) and the newest schema kubernetes-validate bundles.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
MONITORING = "monitoring.coreos.com/v1"
FULLNAME = "kubetrain"


def rule_set(rules: list[dict[str, Any]] | tuple[Rule, ...]) -> set[tuple[Any, ...]]:
    out = set()
    for rule in rules:
        if isinstance(rule, Rule):
            out.add((rule.api_group, tuple(rule.resources), tuple(rule.verbs)))
        else:
            (group,) = rule["apiGroups"]
            out.add((group, tuple(rule["resources"]), tuple(rule["verbs"])))
    return out


def config_map(objects: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    (found,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith(suffix)]
    return found


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]


# ----------------------------------------------------------------------------- lint and render


def test_helm_lint_strict_is_clean() -> None:
    import helm_python as helm

    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert problems == [], problems


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_core_object_passes_kubernetes_validate_strict(
    name: str, version: str
) -> None:
    objects = render(VALUE_SETS[name])
    assert objects
    for obj in objects:
        if obj["apiVersion"] == MONITORING:
            continue  # no bundled schema; see the module docstring
        kubernetes_validate.validate(obj, version, strict=True)


def test_value_sets_render_what_they_say() -> None:
    kinds = {name: {o["kind"] for o in render(values)} for name, values in VALUE_SETS.items()}
    assert "CustomResourceDefinition" in kinds["defaults (cluster-wide)"]
    assert "CustomResourceDefinition" not in kinds["no CRDs"]
    assert "Role" in kinds["namespaced"] and "Role" not in kinds["defaults (cluster-wide)"]
    assert "NetworkPolicy" in kinds["NetworkPolicy on"]
    assert "NetworkPolicy" not in kinds["defaults (cluster-wide)"]
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds["everything on"]


def test_rendering_is_free_of_duplicate_keys_and_empty_documents() -> None:
    # chart_support's loader raises on a duplicate key; a document that is only a comment would be
    # an object kubectl cannot apply.
    for values in VALUE_SETS.values():
        for path, text in render_text(values).items():
            if path.endswith("NOTES.txt"):
                continue
            for doc in text.split("\n---\n"):
                body = [x for x in doc.splitlines() if x.strip() and not x.lstrip().startswith("#")]
                assert body == [] or yaml.safe_load(doc), path


def test_notes_tell_the_next_three_commands() -> None:
    notes = render_text({})["kubetrain/templates/NOTES.txt"]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}" in notes
    assert "kubetrain validate run.yaml && kubectl apply -f run.yaml" in notes
    assert "kubectl wait --for=condition=Succeeded trainingrun/NAME" in notes
    assert (
        "kubetrain crd"
        in render_text({"crds": {"enabled": False}})["kubetrain/templates/NOTES.txt"]
    )


# ---------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "values",
    [
        {"replicas": 2},
        {"operator": {"replicaCount": 2}},
        {"crds": {"enabeld": True}},
        {"metrics": {"prometheusRule": {"stallTimeout": "15m"}}},
        {"operator": {"watchNamespaces": ["Not_A_Namespace"]}},
        {"storage": {"s3": {"endpoint": "https://key:secret@minio.example"}}},
        {"storage": {"cacheRoot": "ftp://elsewhere"}},
        {"storage": {"outputRoot": "s3://runs"}},  # removed: every run names spec.output.uri
        {"storage": {"s3": {"endpoint": "http://minio.storage:9000"}}},  # needs the allowance
    ],
    ids=repr,
)
def test_schema_refuses_unknown_or_malformed_values(values: dict[str, Any]) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError):
        chart().validate_schema(values)
    with pytest.raises(helm.HelmError):
        render(values)


def test_schema_accepts_every_documented_value_set() -> None:
    for values in VALUE_SETS.values():
        chart().validate_schema(values)


def test_every_value_is_commented_and_in_the_schema() -> None:
    schema = chart().schema
    lines = (CHART / "values.yaml").read_text().splitlines()

    def walk(values: dict[str, Any], props: dict[str, Any], path: str) -> None:
        assert set(values) == set(props), f"{path}: values.yaml vs schema"
        for key, value in values.items():
            sub = props[key]
            if isinstance(value, dict) and sub.get("additionalProperties") is False:
                walk(value, sub["properties"], f"{path}{key}.")

    assert schema["additionalProperties"] is False
    walk(yaml.safe_load("\n".join(lines)), schema["properties"], "")
    for index, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w]*:\s*\S", line):  # a leaf value
            above = lines[index - 1].strip()
            assert above.startswith("#"), f"values.yaml:{index + 1}: {line.strip()} has no comment"


# ------------------------------------------------------------------------------------------ CRD


def test_crd_template_is_the_generated_crd_with_the_keep_policy() -> None:
    source = yaml.safe_load((ROOT / "crds" / "trainingruns.kubetrain.dev.yaml").read_text())
    (kept,) = of_kind(render({}), "CustomResourceDefinition")
    assert kept["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert kept == source
    (plain,) = of_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert plain == source
    assert chart().crds == [], (
        "crds/ must stay out of the chart (.helmignore): Helm would install it twice"
    )


def test_generated_chart_files_are_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "observability" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------- the operator


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, ["--all-namespaces"]),
        (
            {"operator": {"watchNamespaces": ["ml", "research"]}},
            ["--namespace=ml", "--namespace=research"],
        ),
    ],
)
def test_operator_deployment(values: dict[str, Any], expected: list[str]) -> None:
    deployment = named(render(values), "Deployment", FULLNAME)
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"] == ["kopf"]
    args = container["args"]
    assert args[:4] == ["run", "--standalone", "-m", "kubetrain_operator.main"]
    assert [a for a in args if "namespace" in a] == expected
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/kubetrain/operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETRAIN_TRAINER_IMAGE"] == "ghcr.io/kubetrain/trainer:0.1.0"
    assert env["KUBETRAIN_TRAINER_SERVICE_ACCOUNT"] == f"{FULLNAME}-trainer"


#: Every cluster default the chart has a value for, set to something other than its default.
CLUSTER_VALUES: dict[str, Any] = {
    "operator": {"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror"}]},
    "trainer": {
        "image": {"repository": "registry.example/trainer", "tag": "2.0"},
        "serviceAccount": {"name": "ml-trainer"},
        "metricsPort": 9500,
        "gpuMemory": "80Gi",
    },
    "storage": {
        "cacheRoot": "s3://cache/datasets",
        "s3": {
            "endpoint": "http://minio.storage:9000",
            "allowInsecureEndpoint": True,
            "secretName": "s3-credentials",
        },
    },
}


def operator_settings(values: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings the operator reads from the environment the chart's Deployment gives it."""
    (container,) = named(render(values), "Deployment", FULLNAME)["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= ENVIRONMENT, f"passed but never read: {sorted(set(env) - ENVIRONMENT)}"
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        assert isinstance(value, str), f"{name}: a literal value"
        monkeypatch.setenv(name, value)
    return OperatorSettings.from_env()


@pytest.mark.parametrize("values", [*VALUE_SETS.values(), CLUSTER_VALUES], ids=repr)
def test_the_operator_reads_every_setting_the_deployment_passes(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = operator_settings(values, monkeypatch)
    assert settings.metrics_port == 9401
    name = (values.get("trainer") or {}).get("serviceAccount", {}).get("name")
    assert settings.defaults.trainer_service_account == (name or f"{FULLNAME}-trainer")


def test_chart_values_become_the_operator_s_cluster_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert operator_settings({}, monkeypatch).defaults == NO_DEFAULTS.model_copy(
        update={"trainer_service_account": f"{FULLNAME}-trainer"}
    )
    defaults = operator_settings(CLUSTER_VALUES, monkeypatch).defaults
    assert defaults.model_dump() == {
        "trainer_image": "registry.example/trainer:2.0",
        "trainer_service_account": "ml-trainer",
        "image_pull_secrets": ("regcred", "mirror"),
        "metrics_port": 9500,
        "cache_root": "s3://cache/datasets",
        "s3_allow_insecure_endpoint": True,
        "s3_endpoint": "http://minio.storage:9000",
        "s3_secret_name": "s3-credentials",
        "gpu_memory": "80Gi",
    }


def test_images_follow_tag_and_digest_values() -> None:
    digest = "sha256:" + "a" * 64
    values = {"operator": {"image": {"tag": "0.2.0"}}, "trainer": {"image": {"digest": digest}}}
    (container,) = named(render(values), "Deployment", FULLNAME)["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == "ghcr.io/kubetrain/operator:0.2.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETRAIN_TRAINER_IMAGE"] == f"ghcr.io/kubetrain/trainer@{digest}"


# ------------------------------------------------------------------------------------------- RBAC


def test_permissions_hold_no_secrets_exec_or_wildcards() -> None:
    for rule in (*CLUSTER_RULES, *NAMESPACED_RULES):
        assert "*" not in rule.api_group and "*" not in rule.resources and "*" not in rule.verbs
        assert "secrets" not in rule.resources, rule
        assert not any(r.startswith("pods/") and r != "pods/log" for r in rule.resources), rule
        assert rule.scope in ("framework", "application") and rule.why


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_rbac_is_exactly_permissions_py(name: str) -> None:
    values = VALUE_SETS[name]
    objects = render(values)
    namespaces = values.get("operator", {}).get("watchNamespaces")
    cluster_roles = {o["metadata"]["name"]: o for o in of_kind(objects, "ClusterRole")}
    assert rule_set(cluster_roles[f"{FULLNAME}-cluster"]["rules"]) == rule_set(CLUSTER_RULES)
    if namespaces:
        assert set(cluster_roles) == {f"{FULLNAME}-cluster"}
        roles = of_kind(objects, "Role")
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
        for role in roles:
            assert rule_set(role["rules"]) == rule_set(NAMESPACED_RULES)
    else:
        assert of_kind(objects, "Role") == []
        assert rule_set(cluster_roles[FULLNAME]["rules"]) == rule_set(NAMESPACED_RULES)
    for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
        for rule in role["rules"]:
            flat = [*rule["apiGroups"], *rule["resources"], *rule["verbs"]]
            assert "*" not in flat and "secrets" not in rule["resources"]
            assert "pods/exec" not in rule["resources"] and "pods/attach" not in rule["resources"]
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]


def test_every_rendered_rule_is_commented_with_its_scope_and_reason() -> None:
    text = render_text({})["kubetrain/templates/rbac.yaml"]
    rules = (*CLUSTER_RULES, *NAMESPACED_RULES)
    for rule in rules:
        assert f'# {rule.scope}: {rule.why}\n- apiGroups: ["{rule.api_group}"]' in text
    assert text.count("\n- apiGroups:") == len(rules)


def test_trainer_service_account_has_no_api_access() -> None:
    for values in VALUE_SETS.values():
        objects = render(values)
        trainers = [
            sa
            for sa in of_kind(objects, "ServiceAccount")
            if sa["metadata"]["name"] == f"{FULLNAME}-trainer"
        ]
        expected = values.get("operator", {}).get("watchNamespaces") or [NAMESPACE]
        assert sorted(sa["metadata"]["namespace"] for sa in trainers) == sorted(expected)
        assert all(sa["automountServiceAccountToken"] is False for sa in trainers)
        for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
            assert all(s["name"] != f"{FULLNAME}-trainer" for s in binding["subjects"])


# --------------------------------------------------------------------------- network and metrics


def test_network_policy_opens_metrics_only_to_the_operator_and_prometheus() -> None:
    objects = render(EVERYTHING)
    policies = of_kind(objects, "NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies} == {NAMESPACE, "team-a", "team-b"}
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    operator_policy = named(objects, "NetworkPolicy", f"{FULLNAME}-operator")
    assert operator_policy["spec"]["ingress"] == [
        {"from": [prometheus], "ports": [{"port": "metrics", "protocol": "TCP"}]}
    ]
    for policy in policies:
        if policy["metadata"]["name"] != f"{FULLNAME}-stages":
            continue
        metrics_rule, peers_rule = policy["spec"]["ingress"]
        assert metrics_rule["ports"] == [{"port": 9400, "protocol": "TCP"}]
        sources = metrics_rule["from"]
        assert prometheus in sources and len(sources) == 2
        (operator,) = [s for s in sources if "podSelector" in s]
        assert operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
        # Every other port, but never 9400, is open to the run's own pods.
        ranges = [(p["port"], p["endPort"]) for p in peers_rule["ports"]]
        assert ranges == [(1, 9399), (9401, 65535)]


def test_monitors_select_the_exporting_pods_and_the_operator_service() -> None:
    objects = render(EVERYTHING)
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"]["kubetrain.dev/metrics"] == "true"
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_label_kubetrain_dev_stage"],
        "targetLabel": "stage",
    } in endpoint["relabelings"]
    (service_monitor,) = of_kind(objects, "ServiceMonitor")
    service = named(objects, "Service", f"{FULLNAME}-metrics")
    assert (
        service_monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    all_ns = render({"metrics": {"podMonitor": {"enabled": True}}})
    assert of_kind(all_ns, "PodMonitor")[0]["spec"]["namespaceSelector"] == {"any": True}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_monitor_and_policy_select_the_pods_the_operator_renders(tmp_path: Path) -> None:
    """Against `kubetrain render` of a two-node run: the PodMonitor picks exactly one pod per
    stage (the Job's, the PyTorchJob's master: rank 0), on the port it names; the stage policy
    covers every stage pod, workers included."""
    objects = render(EVERYTHING)
    (pod_monitor,) = of_kind(objects, "PodMonitor")
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    templates = stage_pod_templates("tulu-sft.yaml", tmp_path, nodes=2)
    assert any(t["metadata"]["labels"].get("kubetrain.dev/metrics") is None for t in templates)
    picked = [t for t in templates if selects(selector, t["metadata"]["labels"])]
    stages = [t["metadata"]["labels"]["kubetrain.dev/stage"] for t in picked]
    assert sorted(stages) == sorted(
        {t["metadata"]["labels"]["kubetrain.dev/stage"] for t in templates}
    )
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    for template in picked:
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[endpoint["port"]] == 9400
    policy = [
        p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("stages")
    ]
    for template in templates:
        assert selects(
            policy[0]["spec"]["podSelector"]["matchLabels"], template["metadata"]["labels"]
        )


def test_dashboard_config_map_is_the_generated_json_for_the_sidecar() -> None:
    cm = config_map(render(EVERYTHING), "dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["kubetrain.json"] + "\n" == (CHART / "files" / "dashboard.json").read_text()


def test_gitops_config_map_ships_both_health_checks() -> None:
    cm = config_map(render(EVERYTHING), "gitops-health")
    for key, source in (
        ("argocd-health.lua", "argocd-health.lua"),
        ("flux-health-check-exprs.yaml", "flux-health-check-exprs.yaml"),
    ):
        assert cm["data"][key] + "\n" == (ROOT / "observability" / source).read_text()


# -------------------------------------------------------------------------------------- security


def test_every_pod_meets_pod_security_restricted() -> None:
    for values in VALUE_SETS.values():
        specs = pod_specs(render(values))
        assert specs
        for spec in specs:
            assert restricted_violations(spec) == []
            (container,) = spec["containers"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_kubeflow_init_container_template_meets_restricted() -> None:
    cm = config_map(render(EVERYTHING), "pytorch-init-container")
    assert cm["metadata"]["namespace"] == "kubeflow"
    # The training operator fills these Go template fields; any value will do here.
    text = cm["data"]["initContainer.yaml"]
    text = text.replace("{{.InitContainerImage}}", "busybox:1.36").replace(
        "{{.MasterAddr}}", "master"
    )
    (init,) = yaml.safe_load(text)
    assert init["name"] == "init-pytorch"
    pod = {"initContainers": [init], "containers": [], "volumes": []}
    assert restricted_violations({**pod, "containers": [init]}) == []
    patch = yaml.safe_load((CHART / "files" / "kubeflow-training-operator-patch.yaml").read_text())
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "--pytorch-init-container-template-file=/etc/kubetrain-init-container/initContainer.yaml"
    ]
    (volume,) = patch["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]


CREDENTIAL_PATTERNS = {
    "AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "URI with userinfo": re.compile(r"[a-z0-9+.-]+://[^/\s:@]+:[^/\s@]+@"),
    "bearer token": re.compile(r"(?i)bearer\s+[a-z0-9._-]{16,}"),
}
SECRET_ENV = re.compile(r"(?i)(password|secret_access|access_key|token|api_key)")


def credentials_in(objects: list[dict[str, Any]]) -> list[str]:
    found = [f"{o['kind']} {o['metadata']['name']}" for o in objects if o["kind"] == "Secret"]
    text = yaml.safe_dump_all(objects)
    found += [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]
    for spec in pod_specs(objects):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if SECRET_ENV.search(env["name"]) and env.get("value"):
                    found.append(f"env {env['name']} holds a literal value")
    return found


def test_no_rendered_object_holds_a_credential() -> None:
    for values in VALUE_SETS.values():
        assert credentials_in(render(values)) == []


def test_the_credential_check_can_fail() -> None:
    objects = render({})
    leaky = copy.deepcopy(objects)
    (container,) = named(leaky, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"]
    container["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x" * 40})
    assert credentials_in(leaky) == ["env AWS_SECRET_ACCESS_KEY holds a literal value"]
    leaky = [*copy.deepcopy(objects), {"kind": "Secret", "metadata": {"name": "s3"}}]
    assert credentials_in(leaky) == ["Secret s3"]
    (container,) = named(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"]
    container["env"].append({"name": "X", "value": "https://minio:pw@minio.local"})
    assert credentials_in(objects) == ["URI with userinfo"]


def test_the_strict_validation_can_fail() -> None:
    deployment = copy.deepcopy(named(render({}), "Deployment", FULLNAME))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_bring_your_own_service_account_needs_its_name() -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})
    objects = render({"serviceAccount": {"create": False, "name": "ops-kubetrain"}})
    assert "ops-kubetrain" not in {
        sa["metadata"]["name"] for sa in of_kind(objects, "ServiceAccount")
    }
    (container_spec,) = pod_specs(objects)
    assert container_spec["serviceAccountName"] == "ops-kubetrain"
    for binding in of_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"][0]["name"] == "ops-kubetrain"
