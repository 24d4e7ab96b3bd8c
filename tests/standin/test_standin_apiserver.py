"""The API server stand-in against real clients: kubectl 1.37 and the `kubernetes` client.

Real: kubectl (apply, get, get -w, explain, patch, delete, api-resources), the kubernetes 35
client, HTTP. Emulated: the API server itself (standin/apiserver.py: a kmock
KubernetesEmulator subclass) with the admission of standin/crd_emulation.py. What is asserted is
what the real API server documents (status codes, `Status` reasons, field paths as kubectl
prints them, resourceVersion and generation semantics), not what the stand-in happens to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from runspecs import ROOT
from standin import StandIn, start_apiserver
from standin_support import Kubectl, tiny_run, wait_for

CRDS = ROOT / "crds"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    with start_apiserver(tmp_path_factory.mktemp("apiserver")) as standin:
        Kubectl(standin).run("apply", "-f", str(CRDS))
        yield standin


@pytest.fixture(scope="module")
def kubectl(cluster: StandIn) -> Kubectl:
    return Kubectl(cluster)


@pytest.fixture(scope="module")
def api(cluster: StandIn) -> client.ApiClient:
    return config.new_client_from_config(str(cluster.kubeconfig))


def run_doc(name: str, **changes: Any) -> dict[str, Any]:
    return tiny_run(name, **changes)


def test_apply_crds_registers_trainingruns_with_short_name_and_columns(kubectl: Kubectl) -> None:
    resources = kubectl.run("api-resources", "--api-group=kubetrain.dev").stdout
    assert "trainingruns" in resources and " tr " in f" {resources} "
    crd = kubectl.json("get", "crd", "trainingruns.kubetrain.dev")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True"
    kubectl.apply(run_doc("columns"))
    header = kubectl.run("get", "tr").stdout.splitlines()[0].split()
    declared = yaml.safe_load((CRDS / "trainingruns.kubetrain.dev.yaml").read_text())
    columns = declared["spec"]["versions"][0]["additionalPrinterColumns"]
    assert header == ["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")]
    wide = kubectl.run("get", "tr", "-o", "wide").stdout.splitlines()[0].split()
    assert wide == ["NAME"] + [c["name"].upper() for c in columns]


def test_the_cluster_starts_with_the_kubeflow_pytorchjob_crd(kubectl: Kubectl) -> None:
    resources = kubectl.run("api-resources", "--api-group=kubeflow.org").stdout
    assert "pytorchjobs" in resources
    explained = kubectl.run("explain", "pytorchjob.spec.pytorchReplicaSpecs").stdout
    assert "replicas" in explained or "PyTorchJob" in explained


def test_explain_reads_the_crd_schema(kubectl: Kubectl) -> None:
    explained = kubectl.run("explain", "trainingrun.spec.training.learningRate").stdout
    declared = yaml.safe_load((CRDS / "trainingruns.kubetrain.dev.yaml").read_text())
    field = declared["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["training"]["properties"]["learningRate"]
    assert field["description"].split()[0] in explained
    assert "KIND:       TrainingRun" in explained


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        (
            {"spec.training.learningRate": -1},
            "spec.training.learningRate",
            "should be greater than or equal to 0",
        ),
        ({"spec.method.stage": "finetune"}, "spec.method.stage", "Unsupported value"),
        ({"spec.data.blockSize": "big"}, "spec.data.blockSize", "must be of type integer"),
        ({"spec.model.architecture.heads": 5}, "spec.model.architecture.heads", "divide"),
    ],
    ids=["minimum", "enum", "type", "cel"],
)
def test_an_invalid_spec_is_refused_by_kubectl_apply_naming_the_field(
    kubectl: Kubectl, changes: dict[str, Any], field: str, words: str
) -> None:
    refused = kubectl.apply(run_doc("invalid", **changes), check=False)
    assert refused.returncode == 1
    assert 'The TrainingRun "invalid" is invalid' in refused.stderr
    assert f"{field}:" in refused.stderr and words in refused.stderr, refused.stderr


def test_unknown_fields_are_a_strict_decoding_error_or_pruned(kubectl: Kubectl) -> None:
    doc = run_doc("unknown", **{"spec.data.bogus": 1})
    refused = kubectl.apply(doc, check=False)
    assert refused.returncode == 1
    assert 'strict decoding error: unknown field "spec.data.bogus"' in refused.stderr
    kubectl.run("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    stored = kubectl.json("get", "tr", "unknown")
    assert "bogus" not in stored["spec"]["data"]
    assert stored["spec"]["data"]["maxRejectedFraction"] == 0.01  # a schema default, applied


def test_immutable_fields_are_refused_on_update_by_the_transition_rules(kubectl: Kubectl) -> None:
    kubectl.apply(run_doc("immutable"))
    refused = kubectl.apply(run_doc("immutable", **{"spec.training.maxSteps": 999}), check=False)
    assert refused.returncode == 1 and "spec.training" in refused.stderr
    assert "immutable" in refused.stderr
    kubectl.apply(run_doc("immutable", **{"spec.maxRestarts": 7}))  # mutable
    assert kubectl.json("get", "tr", "immutable")["spec"]["maxRestarts"] == 7


def test_generation_and_status_subresource_semantics(kubectl: Kubectl) -> None:
    kubectl.apply(run_doc("gen"))
    first = kubectl.json("get", "tr", "gen")
    assert first["metadata"]["generation"] == 1 and first["metadata"]["uid"]
    kubectl.run(
        "patch", "tr", "gen", "--type=merge", "-p", '{"status": {"phase": "Training"}}'
    )  # main resource: status is ignored
    assert "status" not in kubectl.json("get", "tr", "gen")
    kubectl.run(
        "patch",
        "tr",
        "gen",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Training"}, "spec": {"maxRestarts": 9}}',
    )
    after_status = kubectl.json("get", "tr", "gen")
    assert after_status["status"]["phase"] == "Training"
    assert after_status["spec"]["maxRestarts"] == first["spec"]["maxRestarts"]
    assert after_status["metadata"]["generation"] == 1
    assert int(after_status["metadata"]["resourceVersion"]) > int(
        first["metadata"]["resourceVersion"]
    )
    kubectl.run("label", "tr", "gen", "team=ml")
    assert kubectl.json("get", "tr", "gen")["metadata"]["generation"] == 1
    kubectl.run("patch", "tr", "gen", "--type=merge", "-p", '{"spec": {"maxRestarts": 9}}')
    assert kubectl.json("get", "tr", "gen")["metadata"]["generation"] == 2


def test_api_errors_have_the_status_shape(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    body = {"metadata": {"name": "twice"}, "data": {"a": "1"}}
    created = core.create_namespaced_config_map("default", body)
    with pytest.raises(client.ApiException) as exists:
        core.create_namespaced_config_map("default", body)
    assert exists.value.status == 409
    assert json.loads(exists.value.body)["reason"] == "AlreadyExists"
    stale = {"metadata": {"name": "twice", "resourceVersion": "1"}, "data": {"a": "2"}}
    core.patch_namespaced_config_map("twice", "default", {"data": {"a": "3"}})
    with pytest.raises(client.ApiException) as conflict:
        core.replace_namespaced_config_map("twice", "default", stale)
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["reason"] == "Conflict"
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_config_map("absent", "default")
    status = json.loads(missing.value.body)
    assert missing.value.status == 404 and status["kind"] == "Status"
    assert status["message"] == 'configmaps "absent" not found'
    test_op = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": created.metadata.resource_version,
        },
        {"op": "replace", "path": "/data/a", "value": "4"},
    ]
    with pytest.raises(client.ApiException) as guarded:  # Kopf's guarded finalizer patch
        core.patch_namespaced_config_map("twice", "default", test_op)
    assert guarded.value.status == 422


def test_watches_honour_resource_version_and_selectors(
    cluster: StandIn, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    listed = core.list_namespaced_config_map("default", label_selector="watch=me")
    since = listed.metadata.resource_version
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "w1", "labels": {"watch": "me"}}}
    )
    core.create_namespaced_config_map("default", {"metadata": {"name": "w2"}})
    core.patch_namespaced_config_map("w1", "default", {"data": {"x": "1"}})
    core.delete_namespaced_config_map("w1", "default")
    from kubernetes import watch

    events = [
        (e["type"], e["object"].metadata.name)
        for e in watch.Watch().stream(
            core.list_namespaced_config_map,
            "default",
            label_selector="watch=me",
            resource_version=since,
            timeout_seconds=1,
        )
    ]
    assert events == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]
    assert not [c for c in cluster.calls() if c.verb == "watch" and c.code != 200]


def test_get_watch_streams_rows_as_status_changes(kubectl: Kubectl) -> None:
    kubectl.apply(run_doc("watched"))
    watch = kubectl.watch("get", "tr", "watched", "-w")
    try:
        time.sleep(1.5)
        kubectl.run(
            "patch",
            "tr",
            "watched",
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status": {"phase": "Training", "progress": {"step": 7, "loss": 2.5, "eta": "3m"}}}',
        )
        time.sleep(1.5)
    finally:
        watch.terminate()
    lines = watch.communicate(timeout=10)[0].splitlines()
    assert lines[0].split()[:5] == ["NAME", "PHASE", "STEP", "LOSS", "ETA"]
    assert lines[-1].split()[:5] == ["watched", "Training", "7", "2.5", "3m"], lines


def test_finalizers_hold_deletion_and_owners_take_their_dependents(
    kubectl: Kubectl, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(
        "default", {"metadata": {"name": "owner", "finalizers": ["example.com/hold"]}}
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "dependent", "ownerReferences": [ref]}}
    )
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "orphan", "ownerReferences": [ref]}}
    )
    core.delete_namespaced_config_map("owner", "default")
    held = core.read_namespaced_config_map("owner", "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("orphan", "default", {"metadata": {"ownerReferences": None}})
    core.patch_namespaced_config_map("owner", "default", {"metadata": {"finalizers": None}})
    names = lambda: {c.metadata.name for c in core.list_namespaced_config_map("default").items}  # noqa: E731
    wait_for(lambda: "dependent" not in names(), 10, "the garbage collector")
    assert "owner" not in names() and "orphan" in names()


def test_kubectl_delete_waits_for_the_object_to_go(kubectl: Kubectl) -> None:
    kubectl.apply(run_doc("deleted"))
    done = kubectl.run("delete", "tr", "deleted", "--timeout=20s")
    assert "deleted" in done.stdout
    assert kubectl.run("get", "tr", "deleted", check=False).returncode == 1


def test_namespaces_are_listed_and_deleting_one_empties_it(kubectl: Kubectl) -> None:
    kubectl.run("create", "namespace", "scratch", check=False)
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "scratch"}})
    kubectl.run("-n", "scratch", "apply", "-f", "-", input=yaml.safe_dump(run_doc("in-scratch")))
    assert "scratch" in kubectl.run("get", "ns").stdout
    kubectl.run("delete", "ns", "scratch", "--timeout=30s")
    assert "scratch" not in kubectl.run("get", "ns").stdout
    refused = kubectl.run("-n", "scratch", "get", "tr", "in-scratch", check=False)
    assert refused.returncode == 1


def test_requests_are_recorded_as_rbac_sees_them(cluster: StandIn, kubectl: Kubectl) -> None:
    kubectl.apply(run_doc("recorded"))
    kubectl.run(
        "patch",
        "tr",
        "recorded",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Pending"}}',
    )
    calls = [
        (c.verb, c.group, c.resource)
        for c in cluster.calls()
        if c.name == "recorded" or c.path.endswith("/trainingruns")
    ]
    assert ("create", "kubetrain.dev", "trainingruns") in calls
    assert ("patch", "kubetrain.dev", "trainingruns/status") in calls


def test_python_m_tests_standin_writes_a_kubeconfig_kubectl_can_use(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "standin",
            "--port",
            "0",
            "--workdir",
            str(tmp_path),
            "--no-pods",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line == str(tmp_path / "kubeconfig"), line or proc.stderr.read()
        kubectl = Kubectl(StandIn("", Path(line), tmp_path, None, None))  # type: ignore[arg-type]
        kubectl.run("apply", "-f", str(CRDS))
        assert "No resources found" in kubectl.run("get", "tr").stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_core_and_events_k8s_io_events_are_served(kubectl: Kubectl, api: client.ApiClient) -> None:
    involved = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "name": "columns",
        "namespace": "default",
    }
    client.CoreV1Api(api).create_namespaced_event(
        "default",
        {
            "metadata": {"generateName": "kopf-event-"},
            "type": "Normal",
            "reason": "Created",
            "message": "core event",
            "involvedObject": involved,
        },
    )
    client.EventsV1Api(api).create_namespaced_event(
        "default",
        {
            "metadata": {"name": "modern"},
            "type": "Normal",
            "reason": "Scheduled",
            "note": "events.k8s.io event",
            "action": "Create",
            "reportingController": "tests",
            "reportingInstance": "tests-1",
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "regarding": involved,
        },
    )
    core = kubectl.run("get", "events").stdout
    assert "Created" in core and "trainingrun/columns" in core and "core event" in core
    modern = kubectl.json("get", "events.events.k8s.io", "modern")
    assert modern["note"] == "events.k8s.io event"


def test_strategic_merge_patch_merges_lists_by_their_keys(kubectl: Kubectl) -> None:
    containers = [{"name": n, "image": f"{n}:1", "command": ["sleep", "1"]} for n in ("a", "b")]
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "smp"},
            "spec": {"containers": containers},
        }
    )
    kubectl.run(
        "patch", "pod", "smp", "-p", '{"spec": {"containers": [{"name": "b", "image": "b:2"}]}}'
    )  # kubectl's default for built-in kinds: strategic
    images = {
        c["name"]: c["image"] for c in kubectl.json("get", "pod", "smp")["spec"]["containers"]
    }
    assert images == {"a": "a:1", "b": "b:2"}
    refused = kubectl.run("patch", "tr", "columns", "--type=strategic", "-p", "{}", check=False)
    # custom resources take no strategic merge patch: 415, as from the API server
    assert refused.returncode == 1 and "is not supported by" in refused.stderr, refused.stderr
