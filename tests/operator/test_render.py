"""`render`: planned stages → Kubernetes objects (ConfigMap, Service, Jobs, PyTorchJobs).

Real: the rendered dicts of every example and variant; `kubernetes-validate --strict` (the bundled
OpenAPI schemas of Kubernetes 1.33 and the newest bundled release) for ConfigMap, Service, Job and
the PyTorchJob pod templates (as Pod and PodTemplate); the kubeflow-training SDK's own models and
ApiClient for the PyTorchJob round trip; torch's own `torchrun` argument parser for the argv; the
`kubetrain render` CLI run as a subprocess. Emulated: nothing runs in a cluster (none exists here),
so the Pod Security "restricted" profile is checked by a function written from the published
profile rules (https://kubernetes.io/docs/concepts/security/pod-security-standards/), and label and
name syntax by regexes from the Kubernetes API conventions; both checks are shown to fail on bad
input.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubeflow.training import ApiClient, KubeflowOrgV1PyTorchJob
from pydantic import ValidationError

from kubetrain_operator.api import InvalidRun, ResourcesSpec, TrainingRunSpec, parse_run
from kubetrain_operator.cluster_defaults import NO_DEFAULTS, ClusterDefaults
from kubetrain_operator.plan import plan_run
from kubetrain_operator.render import render_all, render_stage
from pod_security import restricted_violations
from runspecs import (
    DELETE,
    LOCAL_ONLY,
    ROOT,
    VARIANTS,
    all_containers,
    all_documents,
    changed,
    example,
    planned,
    pod_templates,
    rendered,
    stage_configs,
    string_leaves,
)

DOCUMENTS = all_documents()
KUBE_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
LABEL_RUN, LABEL_STAGE = "kubetrain.dev/run", "kubetrain.dev/stage"  # issue #2
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue's documented PyTorchJob/Job label
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SHELLS = {"sh", "bash", "dash", "zsh", "ash", "/bin/sh", "/bin/bash", "/usr/bin/env"}


@functools.cache
def objects_of(doc_id: str) -> list[dict[str, Any]]:
    return rendered(DOCUMENTS[doc_id])


def by_kind(doc_id: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects_of(doc_id) if o["kind"] == kind]


def stage_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"][LABEL_STAGE])


def spec_of(doc_id: str) -> dict[str, Any]:
    return dict(DOCUMENTS[doc_id]["spec"])


def rungs_of(doc_id: str) -> list[dict[str, Any]]:
    """api.md: `sanity.rungs`, or the single gate as a one-rung ladder."""
    gate = spec_of(doc_id).get("sanity")
    if gate is None:
        return []
    return list(gate["rungs"]) if "rungs" in gate else [gate]


def expected_shape(doc_id: str, stage: str) -> tuple[int, int]:
    """(nodes, GPUs per node) the spec asks for: api.md (resources, the sanity ladder: a rung
    wider than one node fills whole nodes)."""
    spec = spec_of(doc_id)
    res = spec.get("resources", {})
    gpus = res.get("gpusPerNode", 1)
    if stage.startswith("sanity-"):
        rung = rungs_of(doc_id)[int(stage.removeprefix("sanity-")) - 1]
        want = rung.get("gpus", 1 if gpus > 0 else 0)
        return (want // gpus, gpus) if want > gpus else (1, want)
    return res.get("nodes", 1), gpus


def as_pod(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "pod", **template.get("metadata", {})},
        "spec": template["spec"],
    }


# ------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_core_objects_pass_kubernetes_validate_strict(doc_id: str, version: str) -> None:
    kinds = []
    for obj in objects_of(doc_id):
        kinds.append(obj["kind"])
        if obj["kind"] == "PyTorchJob":
            for _, template in pod_templates(obj):
                kubernetes_validate.validate(as_pod(template), version, strict=True)
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "template"},
                    "template": template,
                }
                kubernetes_validate.validate(pod_template, version, strict=True)
        else:
            kubernetes_validate.validate(obj, version, strict=True)
    assert {"ConfigMap", "Service", "Job", "PyTorchJob"} <= set(kinds)


def test_kubernetes_validate_strict_catches_a_typo() -> None:
    (job, *_) = by_kind("tulu-sft", "Job")
    bad = copy.deepcopy(job)
    bad["spec"]["backofLimit"] = bad["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


def round_trip(obj: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    client = ApiClient()
    model = client._ApiClient__deserialize(copy.deepcopy(obj), "KubeflowOrgV1PyTorchJob")
    return model, client.sanitize_for_serialization(model)


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_pytorchjob_round_trips_through_the_kubeflow_sdk(doc_id: str) -> None:
    jobs = by_kind(doc_id, "PyTorchJob")
    assert jobs
    for job in jobs:
        model, back = round_trip(job)
        assert isinstance(model, KubeflowOrgV1PyTorchJob)
        assert back == job
        master = model.spec.pytorch_replica_specs["Master"]
        assert master.template.spec.containers[0].name == "pytorch"


def test_round_trip_catches_unknown_and_misplaced_fields() -> None:
    (job, *_) = by_kind("tulu-sft", "PyTorchJob")
    typo = copy.deepcopy(job)
    typo["spec"]["nProcPerNode"] = typo["spec"].pop("nprocPerNode")
    assert round_trip(typo)[1] != typo
    misplaced = copy.deepcopy(job)
    misplaced["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["replicas"] = 1
    assert round_trip(misplaced)[1] != misplaced


# ---------------------------------------------------------------------- PyTorchJob and Jobs


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_pytorchjob_in_kubeflow_v1_shape(doc_id: str) -> None:
    from torch.distributed.run import get_args_parser

    spec = spec_of(doc_id)
    res = spec.get("resources", {})
    gpu_resource = res.get("gpuResource", "nvidia.com/gpu")
    configs = stage_configs(objects_of(doc_id))
    for job in by_kind(doc_id, "PyTorchJob"):
        stage = stage_of(job)
        nodes, gpus = expected_shape(doc_id, stage)
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1
        if nodes > 1:
            assert set(replicas) == {"Master", "Worker"}
            assert replicas["Worker"]["replicas"] == nodes - 1
        else:
            assert set(replicas) == {"Master"}
        assert job["spec"]["nprocPerNode"] == str(max(gpus, 1))
        commands = []
        for role, template in pod_templates(job):
            assert replicas[role]["restartPolicy"] == "Never"
            pod = template["spec"]
            assert pod["restartPolicy"] == "Never"
            (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            if gpus:
                assert limits[gpu_resource] == requests[gpu_resource] == str(gpus)
            else:
                assert not [k for k in {**limits, **requests} if k.endswith("gpu")]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory"
            assert shm["sizeLimit"] == res.get("sharedMemory", "8Gi")
            commands.append(container["command"])

            assert container["command"][0] == "torchrun"
            args = get_args_parser().parse_args(container["command"][1:])
            assert (args.nnodes, args.nproc_per_node) == (str(nodes), str(max(gpus, 1)))
            assert args.module and args.training_script == "kubetrain_trainer"
            verb, flag, config_path, workdir_flag, workdir = args.training_script_args
            assert (verb, flag, workdir_flag) == ("train", "--config", "--workdir")
            assert workdir == container["workingDir"]
            config_dir, _, file = config_path.rpartition("/")
            assert volumes[mounts[config_dir]]["configMap"]["name"] == configs_name(doc_id)
            assert json.loads(configs[file])["stage"] == stage.partition("-")[0]
            attempt = {e["name"]: e.get("value") for e in container["env"]}["KUBETRAIN_ATTEMPT"]
            assert attempt == "1"
        assert all(c == commands[0] for c in commands), "Master and Workers run the same argv"


def test_render_shows_the_ladder_in_order_with_its_overrides() -> None:
    """One PyTorchJob `<run>-sanity-<i>` per rung, in order, each with the rung's shape and
    overrides (seed 003: 1 GPU without DeepSpeed, 8-bit optimizer; then ZeRO-3 on 2; then 8)."""
    doc = VARIANTS["ladder-2x4"]
    objects = rendered(doc)
    name = doc["metadata"]["name"]
    jobs = [o for o in objects if o["kind"] == "PyTorchJob"]
    assert [j["metadata"]["name"] for j in jobs] == [
        f"{name}-sanity-1",
        f"{name}-sanity-2",
        f"{name}-sanity-3",
        f"{name}-train-1",
    ]
    configs = stage_configs(objects)
    rungs = doc["spec"]["sanity"]["rungs"]
    for index, (job, rung) in enumerate(zip(jobs, rungs, strict=False), start=1):
        config = json.loads(configs[f"sanity-{index}.json"])
        assert config["distributed"]["zeroStage"] == rung.get("zeroStage", 3)
        assert config["training"]["optimizer"] == rung.get("optimizer", "adamw_torch")
        assert config["training"]["microBatchSize"] == rung.get("microBatchSize", 1)
        assert config["training"]["maxSteps"] == rung["steps"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        nodes = 1 + replicas.get("Worker", {}).get("replicas", 0)
        assert nodes * int(job["spec"]["nprocPerNode"]) == rung["gpus"]
        assert job["metadata"]["labels"][LABEL_STAGE] == f"sanity-{index}"
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "sanity"


def test_render_refuses_bad_rung_overrides() -> None:
    """An 8-bit optimizer on a 1-GPU rung without ZeRO is fine; on a 2-GPU ZeRO-3 rung it is not."""
    ok = changed(
        VARIANTS["ladder-2x4"],
        {"spec.sanity.rungs": [{"gpus": 1, "zeroStage": 0, "optimizer": "adamw_8bit"}]},
    )
    assert rendered(ok)
    bad = changed(
        VARIANTS["ladder-2x4"],
        {"spec.sanity.rungs": [{"gpus": 2, "zeroStage": 3, "optimizer": "adamw_8bit"}]},
    )
    with pytest.raises(InvalidRun) as refused:
        rendered(bad)
    assert [p.path for p in refused.value.problems] == ["spec.sanity.rungs[0].optimizer"]


def configs_name(doc_id: str) -> str:
    (config_map,) = by_kind(doc_id, "ConfigMap")
    return str(config_map["metadata"]["name"])


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_preprocess_and_merge_jobs(doc_id: str) -> None:
    configs = stage_configs(objects_of(doc_id))
    gpu_resource = spec_of(doc_id).get("resources", {}).get("gpuResource", "nvidia.com/gpu")
    jobs = {stage_of(j): j for j in by_kind(doc_id, "Job")}
    assert set(jobs) == {"preprocess", "merge"}
    for stage, job in jobs.items():
        ((_, template),) = pod_templates(job)
        pod = template["spec"]
        assert pod["restartPolicy"] == "Never"
        assert job["spec"]["backoffLimit"] == 0  # the operator owns retries
        (container,) = pod["containers"]
        command = container["command"]
        assert command[:4] == ["python", "-m", "kubetrain_trainer", stage]
        assert command[4] == "--config" and command[6:] == ["--workdir", container["workingDir"]]
        assert json.loads(configs[command[5].rpartition("/")[2]])["stage"] == stage
        names = {c["name"] for c in pod["containers"]}
        for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
            assert rule["onExitCodes"]["containerName"] in names
            assert rule["action"] == "FailJob" and set(rule["onExitCodes"]["values"]) <= {2, 3}
        gpus = container.get("resources", {}).get("limits", {}).get(gpu_resource, "0")
        assert int(gpus) <= (0 if stage == "preprocess" else 1)
        if stage == "preprocess":  # never the training pods' CPUs and memory
            res = spec_of(doc_id).get("resources", {})
            limits = container["resources"]["limits"]
            assert limits == {
                "cpu": str(res.get("preprocess", {}).get("cpu", "4")),
                "memory": str(res.get("preprocess", {}).get("memory", "16Gi")),
            }


@pytest.mark.parametrize(("deadline", "seconds"), [(None, 24 * 3600), ("36h30m", 131_400)])
def test_preprocess_and_merge_jobs_have_a_deadline_training_has_none(
    deadline: str | None, seconds: int
) -> None:
    """A stage that never ends (issue 16): Kubernetes stops a Job past spec.stageDeadline."""
    doc = DOCUMENTS["llama-lora-merge"]
    if deadline is not None:
        doc = changed(doc, {"spec.stageDeadline": deadline})
    objects = rendered(doc)
    jobs = {stage_of(o): o["spec"] for o in objects if o["kind"] == "Job"}
    assert {stage: job.get("activeDeadlineSeconds") for stage, job in jobs.items()} == {
        "preprocess": seconds,
        "merge": seconds,
    }
    for job in (o for o in objects if o["kind"] == "PyTorchJob"):
        assert "activeDeadlineSeconds" not in job["spec"]["runPolicy"], "training: stallTimeout"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_no_example_gives_preprocessing_a_gpu(path: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    target = "local" if path.stem in LOCAL_ONLY else "cluster"
    _, plan = planned(doc, target=target)
    preprocess = plan.stage("preprocess")
    assert preprocess is not None and preprocess.gpus_per_node == 0
    requested = {
        **preprocess.resources.get("requests", {}),
        **preprocess.resources.get("limits", {}),
    }
    assert not [k for k in requested if "gpu" in k]
    if target == "cluster":
        (job,) = [o for o in rendered(doc) if stage_of_or_none(o) == "preprocess"]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert not [k for k in container["resources"]["limits"] if "gpu" in k]


def stage_of_or_none(obj: dict[str, Any]) -> str | None:
    return obj["metadata"]["labels"].get(LABEL_STAGE)


RECOMMENDED = ("name", "instance", "component", "part-of", "version", "managed-by")


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_labels_name_the_run_and_the_stage(doc_id: str) -> None:
    name = DOCUMENTS[doc_id]["metadata"]["name"]
    queue = spec_of(doc_id).get("queueName")
    stages = {"preprocess", "train", "merge"} | {
        f"sanity-{i}" for i in range(1, len(rungs_of(doc_id)) + 1)
    }
    for obj in objects_of(doc_id):
        labels = obj["metadata"]["labels"]
        assert labels[LABEL_RUN] == name
        assert obj["metadata"]["namespace"] == "ml"
        # Kubernetes' recommended labels, on every object
        assert {f"app.kubernetes.io/{k}" for k in RECOMMENDED} <= set(labels)
        assert labels["app.kubernetes.io/instance"] == name
        assert (
            labels["app.kubernetes.io/part-of"] == labels["app.kubernetes.io/name"] == "kubetrain"
        )
        if obj["kind"] in ("Job", "PyTorchJob"):
            assert labels[LABEL_STAGE] in stages
            assert labels["app.kubernetes.io/component"] == labels[LABEL_STAGE].partition("-")[0]
            assert labels.get(QUEUE_LABEL) == queue  # set when queueName is, absent otherwise
            for _, template in pod_templates(obj):
                pod_labels = template["metadata"]["labels"]
                assert pod_labels[LABEL_RUN] == name
                assert pod_labels[LABEL_STAGE] == labels[LABEL_STAGE]
                assert {f"app.kubernetes.io/{k}" for k in RECOMMENDED} <= set(pod_labels)
        for key, value in labels.items():
            assert_label(key, value)
    assert any(QUEUE_LABEL in o["metadata"]["labels"] for o in objects_of(doc_id)) == bool(queue)


def assert_label(key: str, value: str) -> None:
    prefix, _, label_name = key.rpartition("/")
    assert len(label_name) <= 63 and LABEL_NAME.match(label_name), key
    parts = prefix.split(".") if prefix else []
    assert len(prefix) <= 253 and all(DNS1123_LABEL.match(p) for p in parts), key
    assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)


def test_longest_queue_name_the_api_accepts_is_a_valid_label() -> None:
    schema = TrainingRunSpec.model_json_schema(by_alias=True)["properties"]["queueName"]
    longest = next(s["maxLength"] for s in schema["anyOf"] if "maxLength" in s)
    queue = "q" + "-q" * ((longest - 1) // 2)
    queue += "q" * (longest - len(queue))
    objects = rendered(changed(example("tulu-sft"), {"spec.queueName": queue}))
    for obj in objects:
        for key, value in obj["metadata"]["labels"].items():
            assert_label(key, value)
    jobs = [o for o in objects if o["kind"] in ("Job", "PyTorchJob")]
    assert len(jobs) >= 4
    assert sum(QUEUE_LABEL in o["metadata"]["labels"] for o in objects) == len(jobs)


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_metrics_service_selects_rank_zero_only(doc_id: str) -> None:
    (service,) = by_kind(doc_id, "Service")
    selector = service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 9400  # docs/metrics.md, docs/architecture.md
    for obj in objects_of(doc_id):
        for role, template in pod_templates(obj):
            selected = selector.items() <= template["metadata"]["labels"].items()
            assert selected == (role in ("Master", "Job")), (obj["metadata"]["name"], role)
            if selected:
                names = {
                    p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                }
                assert port["targetPort"] in names


def test_node_selector_and_tolerations_reach_the_pods() -> None:
    """resources.nodeSelector is for the training pods (and a GPU merge), not for preprocessing."""
    resources = VARIANTS["pvc-everywhere"]["spec"]["resources"]
    seen = set()
    for obj in rendered(VARIANTS["pvc-everywhere"]):
        for _, template in pod_templates(obj):
            stage = template["metadata"]["labels"][LABEL_STAGE]
            seen.add(stage)
            if stage == "preprocess":
                assert "nodeSelector" not in template["spec"]
            else:
                assert template["spec"]["nodeSelector"] == resources["nodeSelector"]
            assert template["spec"]["tolerations"] == resources["tolerations"]
    assert {"preprocess", "train", "merge"} <= seen


def test_namespace_only_when_given_and_block_style_configs() -> None:
    """`kubetrain render` without -n writes no metadata.namespace (so `kubectl apply -n ml -f -`
    places everything); the ConfigMap's JSON is a YAML block, readable as it is."""
    plain = render_cli("examples/tulu-sft.yaml")
    assert plain.returncode == 0, plain.stderr
    objects = list(yaml.safe_load_all(plain.stdout))
    assert objects and all("namespace" not in o["metadata"] for o in objects)
    assert "preprocess.json: |" in plain.stdout
    assert '"apiVersion": "kubetrain.dev/stage-v1"' in plain.stdout  # not an escaped one-liner
    placed = render_cli("examples/tulu-sft.yaml", "-n", "ml")
    assert all(o["metadata"]["namespace"] == "ml" for o in yaml.safe_load_all(placed.stdout))
    as_json = render_cli("examples/tulu-sft.yaml", "-o", "json")
    listing = json.loads(as_json.stdout)
    assert listing["kind"] == "List" and listing["items"] == objects


def test_pvc_claims_are_mounted_where_the_configs_point() -> None:
    objects = rendered(VARIANTS["pvc-everywhere"])
    paths = {
        v
        for text in stage_configs(objects).values()
        for _, v in string_leaves(json.loads(text))
        if v.startswith("/mnt/pvc/")
    }
    assert paths
    for obj in objects:
        for _, template in pod_templates(obj):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            claims = {
                m["mountPath"]: volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
                for m in template["spec"]["containers"][0]["volumeMounts"]
                if "persistentVolumeClaim" in volumes[m["name"]]
            }
            assert set(claims.values()) == {"models", "datasets", "runs", "cache"}
            for path in paths:
                mount = next(m for m in claims if path == m or path.startswith(m + "/"))
                assert mount == f"/mnt/pvc/{claims[mount]}"


# ---------------------------------------------------------------- Pod Security "restricted"


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_every_pod_meets_pod_security_restricted(doc_id: str) -> None:
    templates = [t for obj in objects_of(doc_id) for _, t in pod_templates(obj)]
    assert len(templates) >= 3
    for template in templates:
        assert restricted_violations(template["spec"]) == []


MUTATIONS = {
    "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
    "escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    "root user": lambda p: p["securityContext"].update(runAsUser=0),
    "root allowed": lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
    "caps kept": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
    "caps added": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(
        add=["SYS_ADMIN"]
    ),
    "unconfined": lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    "no seccomp": lambda p: p["securityContext"].pop("seccompProfile"),
    "host path": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "host network": lambda p: p.update(hostNetwork=True),
    "host pid": lambda p: p.update(hostPID=True),
    "host port": lambda p: p["containers"][0]["ports"][0].update(hostPort=9400),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_restricted_check_catches_violations(mutation: str) -> None:
    (job, *_) = by_kind("tulu-sft", "Job")
    pod = copy.deepcopy(job["spec"]["template"]["spec"])
    MUTATIONS[mutation](pod)
    assert restricted_violations(pod) != []


# ---------------------------------------------------------------------------------- secrets

SECRET_LIKE = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


@pytest.mark.parametrize("doc_id", sorted(DOCUMENTS))
def test_secrets_only_by_reference(doc_id: str) -> None:
    s3 = spec_of(doc_id).get("storage", {}).get("s3", {})
    refs = set()
    for obj in objects_of(doc_id):
        assert obj["kind"] != "Secret"
        for _, template in pod_templates(obj):
            for volume in template["spec"]["volumes"]:
                assert "secret" not in volume and "projected" not in volume
            for c in all_containers(template["spec"]):
                assert "envFrom" not in c
                for env in c.get("env", []):
                    if "valueFrom" in env:
                        assert set(env["valueFrom"]) == {"secretKeyRef"}, env
                        ref = env["valueFrom"]["secretKeyRef"]
                        refs.add((env["name"], ref["name"], ref["key"]))
                    else:
                        assert not SECRET_LIKE.search(env["name"]), env
    hf = spec_of(doc_id).get("storage", {}).get("hf", {})
    if "secretName" in hf:  # hub-model: hf:// with a token Secret
        refs.remove(("HF_TOKEN", hf["secretName"], hf.get("tokenKey", "HF_TOKEN")))
    if "secretName" in s3:
        assert refs == {
            ("AWS_ACCESS_KEY_ID", s3["secretName"], s3.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")),
            (
                "AWS_SECRET_ACCESS_KEY",
                s3["secretName"],
                s3.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"),
            ),
        }
    else:
        assert refs == set()


def render_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetrain_operator.cli", "render", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


EXAMPLE_ARGS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "examples").glob("*.yaml")
    if p.stem in DOCUMENTS  # the cluster's examples (LOCAL_ONLY ones are for `kubetrain run`)
)


def test_render_is_byte_identical_and_leaks_no_credentials() -> None:
    """Two `kubetrain render` runs (different hash seeds, credentials in the environment)."""
    sentinel = "s3cr3t-sentinel-value"
    env = {"AWS_SECRET_ACCESS_KEY": sentinel, "AWS_ACCESS_KEY_ID": sentinel, "HF_TOKEN": sentinel}
    first = render_cli(*EXAMPLE_ARGS, "-n", "ml", env={**env, "PYTHONHASHSEED": "1"})
    second = render_cli(*EXAMPLE_ARGS, "-n", "ml", env={**env, "PYTHONHASHSEED": "2"})
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert sentinel not in first.stdout and sentinel not in first.stderr
    documents = list(yaml.safe_load_all(first.stdout))
    doc_ids = [p.rpartition("/")[2].removesuffix(".yaml") for p in EXAMPLE_ARGS]
    assert documents == [obj for doc_id in doc_ids for obj in objects_of(doc_id)]


# ------------------------------------------------------------------------------------- names


MAX_RUN_NAME = 50  # api.md: metadata.name is a DNS-1035 label of at most 50 characters


def longest_name(prefix: str, last: str = "z") -> str:
    return (prefix + "x" * MAX_RUN_NAME)[: MAX_RUN_NAME - 1] + last


def max_nodes() -> int:
    return int(ResourcesSpec.model_json_schema(by_alias=True)["properties"]["nodes"]["maximum"])


def names_of(doc: dict[str, Any], attempts: tuple[int, ...] = (1, 2)) -> dict[str, str]:
    run, plan = planned(doc)
    names = {f"{o['kind']}/{o['metadata']['name']}": o["kind"] for o in rendered(doc)}
    for stage in plan.stages:
        for attempt in attempts:
            for obj in render_stage(run, plan, stage, attempt, "ml"):
                names[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["kind"]
    return names


@pytest.mark.parametrize("base", ["tulu-sft", "no-sanity-cpu-2-nodes", "pvc-everywhere"])
def test_child_names_fit_for_the_longest_run_name(base: str) -> None:
    doc = changed(DOCUMENTS[base], {"metadata.name": longest_name("run-with-a-long-name-")})
    parse_run(doc)  # the API accepts it
    names = names_of(doc)
    worker_suffix = f"-worker-{max_nodes() - 2}"  # training operator's per-pod Service/hostname
    for key, kind in names.items():
        name = key.partition("/")[2]
        assert len(name) <= 63 and DNS1035.match(name), name
        if kind == "PyTorchJob":
            assert len(name + worker_suffix) <= 63, name
            assert len(name + "-master-0") <= 63


def test_child_names_differ_for_long_names_with_a_shared_prefix() -> None:
    prefix = "team-llama-finetune-experiment-"
    first = changed(example("tulu-sft"), {"metadata.name": longest_name(prefix, "a")})
    second = changed(example("tulu-sft"), {"metadata.name": longest_name(prefix, "b")})
    assert first["metadata"]["name"][:-1] == second["metadata"]["name"][:-1]
    a, b = names_of(first), names_of(second)
    assert not set(a) & set(b)
    # ConfigMap, Service, preprocess, 3 sanity rungs, merge, and a train job per attempt (1, 2).
    assert len(a) == len(b) == 9


def test_no_shell_anywhere() -> None:
    for doc_id in sorted(DOCUMENTS):
        for obj in objects_of(doc_id):
            for _, template in pod_templates(obj):
                for c in all_containers(template["spec"]):
                    assert "args" not in c
                    assert c["command"][0] not in SHELLS
                    assert "-c" not in c["command"]
                    assert not any("shell=True" in item for item in c["command"])


# ------------------------------------------------------------------------- cluster defaults

CLUSTER = ClusterDefaults(
    trainer_image="registry.example/kubetrain/trainer@sha256:" + "b" * 64,
    trainer_service_account="kubetrain-trainer",
    image_pull_secrets=("regcred", "mirror-cred"),
    metrics_port=9500,
    cache_root="s3://cluster-cache/datasets",
    s3_endpoint="https://minio.storage.example",
    s3_secret_name="cluster-s3",
)


def with_defaults(doc: dict[str, Any], defaults: ClusterDefaults) -> list[dict[str, Any]]:
    run = parse_run(doc)
    return render_all(run, plan_run(run, defaults=defaults), namespace="ml")


def stage_pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t["spec"] for obj in objects for _, t in pod_templates(obj)]


def configs_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in stage_configs(objects).items()}


def bare_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without what the cluster defaults could fill in."""
    return changed(doc, {"spec.image": DELETE, "spec.storage": DELETE, "spec.sanity": DELETE})


def test_cluster_defaults_fill_what_the_spec_leaves_unset() -> None:
    objects = with_defaults(bare_spec(example("llama-lora-merge")), CLUSTER)
    pods = stage_pods(objects)
    assert len(pods) >= 3
    for pod in pods:
        assert pod["serviceAccountName"] == "kubetrain-trainer"
        assert pod["automountServiceAccountToken"] is False
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror-cred"}]
        (container,) = pod["containers"]
        assert container["image"] == CLUSTER.trainer_image
        assert container["ports"] == [{"name": "metrics", "containerPort": 9500, "protocol": "TCP"}]
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
        }
        assert refs == {"cluster-s3"}
    (service,) = [o for o in objects if o["kind"] == "Service"]
    assert service["spec"]["ports"][0]["port"] == 9500
    configs = configs_of(objects)
    assert configs["preprocess.json"]["cacheRoot"] == "s3://cluster-cache/datasets"
    for config in configs.values():
        assert config["metricsPort"] == 9500
        assert config["s3"]["endpoint"] == "https://minio.storage.example"
        assert config["s3"]["allowInsecureEndpoint"] is False


def test_the_trainer_service_account_is_rendered_first_without_an_owner_or_token() -> None:
    objects = with_defaults(example("tulu-sft"), CLUSTER)
    account = objects[0]
    assert account == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": "kubetrain-trainer",
            "namespace": "ml",
            "labels": {
                "app.kubernetes.io/name": "kubetrain",
                "app.kubernetes.io/component": "trainer",
                "app.kubernetes.io/part-of": "kubetrain",
                "app.kubernetes.io/managed-by": "kubetrain-operator",
            },
        },
        "automountServiceAccountToken": False,
    }
    assert [o["kind"] for o in objects].count("ServiceAccount") == 1
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(account, version, strict=True)


def test_the_spec_wins_over_every_cluster_default() -> None:
    doc = changed(
        example("llama-lora-merge"),
        {
            "spec.image": "own.example/trainer:1.2",
            "spec.storage": {
                "s3": {
                    "secretName": "own-s3",
                    "endpoint": "http://own-minio:9000",
                    "allowInsecureEndpoint": True,
                },
                "cacheRoot": "s3://own-cache/",
            },
        },
    )
    objects = with_defaults(doc, CLUSTER)
    for pod in stage_pods(objects):
        (container,) = pod["containers"]
        assert container["image"] == "own.example/trainer:1.2"
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
        }
        assert refs == {"own-s3"}
    configs = configs_of(objects)
    assert configs["preprocess.json"]["cacheRoot"] == "s3://own-cache"
    for config in configs.values():
        assert config["s3"] == {
            "endpoint": "http://own-minio:9000",
            "region": "",
            "allowInsecureEndpoint": True,
        }


def test_without_defaults_pods_keep_the_built_in_behaviour() -> None:
    objects = with_defaults(bare_spec(example("llama-lora-merge")), NO_DEFAULTS)
    assert "ServiceAccount" not in [o["kind"] for o in objects]
    output = example("llama-lora-merge")["spec"]["output"]["uri"].rstrip("/")
    assert configs_of(objects)["preprocess.json"]["cacheRoot"] == f"{output}/cache"
    for pod in stage_pods(objects):
        assert "serviceAccountName" not in pod and "imagePullSecrets" not in pod
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        assert container["image"] == NO_DEFAULTS.trainer_image
        assert not [e for e in container["env"] if "valueFrom" in e]


def test_the_default_s3_secret_only_reaches_runs_that_use_s3() -> None:
    doc = changed(
        bare_spec(example("llama-lora-merge")),
        {
            "spec.model.uri": "pvc://models/llama",
            "spec.data.train": ["pvc://data/train.jsonl"],
            "spec.output.uri": "pvc://out/run",
        },
    )
    no_cache = CLUSTER.model_copy(update={"cache_root": "pvc://cache/datasets"})
    objects = with_defaults(doc, no_cache)
    for pod in stage_pods(objects):
        assert not [e for e in pod["containers"][0]["env"] if "valueFrom" in e]
    with_s3_cache = with_defaults(doc, CLUSTER)  # the default cache is on S3: it needs the keys
    for pod in stage_pods(with_s3_cache):
        assert [e for e in pod["containers"][0]["env"] if "valueFrom" in e]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trainer_image", "trainer:latest; rm -rf /"),
        ("trainer_service_account", "Not_A_Name"),
        ("image_pull_secrets", ("ok", "bad name")),
        ("metrics_port", 70000),
        ("cache_root", "/srv/cache"),
        ("cache_root", "s3://key:secret@bucket/cache"),
        ("s3_endpoint", "http://minio:9000"),
        ("s3_endpoint", "https://169.254.169.254"),
        ("s3_secret_name", "UPPER"),
    ],
)
def test_cluster_defaults_refuse_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        ClusterDefaults(**{field: value})
    assert caught.value.errors()[0]["loc"][0] == field


def test_an_insecure_default_endpoint_must_be_allowed_explicitly() -> None:
    allowed = ClusterDefaults(s3_endpoint="http://minio:9000", s3_allow_insecure_endpoint=True)
    run = parse_run(bare_spec(example("llama-lora-merge")))
    config = plan_run(run, defaults=allowed).stages[0].config
    assert config["s3"]["allowInsecureEndpoint"] is True


def test_render_cli_with_the_chart_s_flags_is_what_the_operator_creates() -> None:
    doc = bare_spec(example("llama-lora-merge"))
    args = [
        "--image", CLUSTER.trainer_image,
        "--service-account", "kubetrain-trainer",
        "--image-pull-secret", "regcred",
        "--image-pull-secret", "mirror-cred",
        "--metrics-port", "9500",
        "--cache-root", "s3://cluster-cache/datasets",
        "--s3-endpoint", "https://minio.storage.example",
        "--s3-secret-name", "cluster-s3",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "kubetrain_operator.cli", "render", "-", "-n", "ml", *args],
        input=yaml.safe_dump(doc),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "operator")},
    )
    assert proc.returncode == 0, proc.stderr
    assert list(yaml.safe_load_all(proc.stdout)) == with_defaults(doc, CLUSTER)
    bad = subprocess.run(
        [sys.executable, "-m", "kubetrain_operator.cli", "render", "-", "--cache-root", "/x"],
        input=yaml.safe_dump(doc),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "operator")},
    )
    assert bad.returncode == 2
    assert "--cache-root: a pod cannot reach a local path" in bad.stderr
