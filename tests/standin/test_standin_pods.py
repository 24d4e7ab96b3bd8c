"""The pod runner of the cluster stand-in: Jobs and PyTorchJobs whose pods run for real.

Real: kubectl, the processes (the project's Python running small scripts), their mount
namespaces, users, signals, exit codes and files. Emulated (standin/pods.py,
controllers.py): the kubelet, the Job controller and the Kubeflow training operator v1. The
assertions are the documented behaviour of those components (condition types and reasons,
containerStatuses fields, Kubeflow's labels and env), checked from inside the pods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standin import StandIn, start_cluster
from standin_support import Kubectl, condition, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    with start_cluster(tmp_path_factory.mktemp("pods")) as standin:
        yield standin


@pytest.fixture(scope="module")
def kubectl(cluster: StandIn) -> Kubectl:
    return Kubectl(cluster)


def job(name: str, script: str, **pod: Any) -> dict[str, Any]:
    container = {
        "name": "trainer",
        "image": "ignored:latest",
        "command": ["python", "-c", script],
        **pod.pop("container", {}),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            **pod.pop("job", {}),
            "template": {"spec": {"restartPolicy": "Never", "containers": [container], **pod}},
        },
    }


def pvc(cluster: StandIn, claim: str = "shared") -> Path:
    path = cluster.workdir / "pvcs" / claim
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_job(kubectl: Kubectl, name: str, kind: str = "Complete") -> dict[str, Any]:
    done = kubectl.run(
        "wait", f"--for=condition={kind}", f"job/{name}", "--timeout=120s", check=False
    )
    obj = kubectl.json("get", "job", name)
    assert done.returncode == 0, obj.get("status")
    return dict(obj)


def pods_of(cluster: StandIn, owner: str) -> list[dict[str, Any]]:
    return [
        p
        for p in cluster.objects("", "pods", "default")
        if any(r["name"] == owner for r in p["metadata"].get("ownerReferences", []))
    ]


PROBE = """
import json, os, pathlib, socket
out = pathlib.Path("/data/probe.json")
pathlib.Path("/tmp/private").write_text("x")
out.write_text(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "cwd": os.getcwd(), "config": open("/etc/kubetrain/stage.json").read(),
    "secret": os.environ["TOKEN"], "downward": os.environ["POD"],
    "workspace_writable": os.access("/workspace", os.W_OK),
    "config_writable": os.access("/etc/kubetrain", os.W_OK),
    "tmp": sorted(os.listdir("/tmp")), "shm": os.path.isdir("/dev/shm"),
    "null": open("/dev/null").read() == "",
}))
pathlib.Path("/dev/termination-log").write_text('{"rows": 3}')
"""


def test_a_job_pod_runs_with_its_volumes_env_and_user(cluster: StandIn, kubectl: Kubectl) -> None:
    data = pvc(cluster)
    kubectl.run("create", "secret", "generic", "creds", "--from-literal=token=s3cr3t")
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "stages"},
            "data": {"stage.json": '{"apiVersion": "x"}'},
        }
    )
    kubectl.apply(
        job(
            "probe",
            PROBE,
            securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
            container={
                "workingDir": "/workspace",
                "env": [
                    {
                        "name": "TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                    },
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/kubetrain", "readOnly": True},
                    {"name": "work", "mountPath": "/workspace"},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "shm", "mountPath": "/dev/shm"},
                    {"name": "data", "mountPath": "/data"},
                ],
            },
            volumes=[
                {"name": "config", "configMap": {"name": "stages"}},
                {"name": "work", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
            ],
        )
    )
    status = wait_job(kubectl, "probe")["status"]
    assert status["succeeded"] == 1 and condition({"status": status}, "Complete")
    probe = json.loads((data / "probe.json").read_text())
    assert (probe["uid"], probe["gid"]) == (1000, 1000) and 2000 in probe["groups"]
    assert probe["cwd"] == "/workspace" and probe["workspace_writable"]
    assert probe["config"] == '{"apiVersion": "x"}' and not probe["config_writable"]
    assert probe["secret"] == "s3cr3t" and probe["downward"].startswith("probe-")
    # the pod's /tmp is its own emptyDir; a checkout under /tmp (a CI clone) stays reachable in it
    checkout = Path(__file__).resolve().parents[2]
    environment = [checkout.parts[2]] if checkout.parts[1:2] == ("tmp",) else []
    assert probe["tmp"] == sorted(["private", *environment]) and probe["shm"] and probe["null"]
    assert not Path("/tmp/private").exists()
    (pod,) = pods_of(cluster, "probe")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert terminated["message"] == '{"rows": 3}'
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "probe"


def test_a_failing_pod_reports_its_exit_code_and_message_and_fails_the_job(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    script = (
        "import pathlib, sys; pathlib.Path('/dev/termination-log')"
        ".write_text('bad input on line 3'); sys.exit(2)"
    )
    policy = {
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3]},
                }
            ]
        }
    }
    kubectl.apply(job("exit-two", script, job=policy))
    status = wait_job(kubectl, "exit-two", "Failed")["status"]
    failed = condition({"status": status}, "Failed")
    assert failed["reason"] == "PodFailurePolicy" and "exit code 2" in failed["message"]
    assert status["failed"] == 1
    (pod,) = pods_of(cluster, "exit-two")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (2, "Error")
    assert terminated["message"] == "bad input on line 3"
    logs = kubectl.run("logs", pod["metadata"]["name"])
    assert logs.returncode == 0


def test_fallback_to_logs_on_error_puts_the_log_tail_in_the_message(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    script = (
        "import sys; print('first', flush=True); print('the last words', file=sys.stderr); "
        "sys.exit(7)"
    )
    kubectl.apply(
        job("fallback", script, container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    )
    wait_job(kubectl, "fallback", "Failed")
    (pod,) = pods_of(cluster, "fallback")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 7 and terminated["message"].endswith("the last words")


def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    env = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]
    kubectl.apply(job("waits", "import os; assert os.environ['K'] == 'v'", container={"env": env}))

    def waiting() -> dict[str, Any] | None:
        pods = pods_of(cluster, "waits")
        states = pods[0]["status"].get("containerStatuses", []) if pods else []
        return states[0]["state"].get("waiting") if states else None

    state = wait_for(waiting, 30, "a waiting container")
    assert (
        state["reason"] == "CreateContainerConfigError" and '"later" not found' in state["message"]
    )
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later"},
            "stringData": {"k": "v"},
        }
    )
    wait_job(kubectl, "waits")


TRAP = """
import pathlib, signal, sys, time
mark = pathlib.Path("/data/{name}")
def stop(*_):
    mark.write_text("SIGTERM")
    {on_term}
signal.signal(signal.SIGTERM, stop)
mark.write_text("running")
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize(
    ("name", "on_term", "code"),
    [
        ("polite", "sys.exit(143)", 143),
        ("stubborn", "pass", 137),
    ],
)
def test_deleting_a_pod_sends_sigterm_then_sigkill_after_the_grace_period(
    cluster: StandIn, kubectl: Kubectl, name: str, on_term: str, code: int
) -> None:
    data = pvc(cluster)
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "main",
                        "image": "x",
                        "command": ["python", "-c", TRAP.format(name=name, on_term=on_term)],
                        "volumeMounts": [{"name": "d", "mountPath": "/data"}],
                    }
                ],
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "shared"}}],
            },
        }
    )
    wait_for(
        lambda: (data / name).exists() and (data / name).read_text() == "running",
        30,
        "the pod to run",
    )
    container = next(c for c in cluster.runner.running.values() if c.name == name)
    start = time.monotonic()
    kubectl.run("delete", "pod", name, "--timeout=30s")
    took = time.monotonic() - start
    assert (data / name).read_text() == "SIGTERM"
    assert container.proc.returncode in (code - 128 - 256, -(code - 128), code)
    assert (took >= 1.9) == (code == 137), took  # SIGKILL only after the 2 s grace period


PYTORCH = """
import json, os, pathlib, socket
env = {k: v for k, v in os.environ.items() if k in (
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NNODES", "PET_NPROC_PER_NODE",
    "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT", "PYTHONUNBUFFERED")}
env["resolved"] = socket.gethostbyname(os.environ["MASTER_ADDR"])
pathlib.Path("/data/" + os.environ["HOSTNAME"] + ".json").write_text(json.dumps(env))
"""


def pytorchjob(name: str, suspend: bool = False) -> dict[str, Any]:
    template = {
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "pytorch",
                    "image": "x",
                    "command": ["python", "-c", PYTORCH],
                    "volumeMounts": [{"name": "d", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "shared"}}],
        }
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "nprocPerNode": "2",
            "runPolicy": {"suspend": suspend},
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "restartPolicy": "Never", "template": template},
                "Worker": {"replicas": 2, "restartPolicy": "Never", "template": template},
            },
        },
    }


def wait_pytorchjob(kubectl: Kubectl, name: str) -> dict[str, Any]:
    done = kubectl.run(
        "wait", "--for=condition=Succeeded", f"pytorchjob/{name}", "--timeout=120s", check=False
    )
    obj = kubectl.json("get", "pytorchjob", name)
    assert done.returncode == 0, obj.get("status")
    return dict(obj)


def test_a_pytorchjob_gets_kubeflows_pods_labels_env_and_conditions(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    data = pvc(cluster)
    kubectl.apply(pytorchjob("ddp"))
    obj = wait_pytorchjob(kubectl, "ddp")
    types = [c["type"] for c in obj["status"]["conditions"]]
    assert types[0] == "Created" and "Running" in types and types[-1] == "Succeeded"
    assert condition(obj, "Running")["status"] == "False"
    assert condition(obj, "Succeeded")["reason"] == "PyTorchJobSucceeded"
    replicas = obj["status"]["replicaStatuses"]
    assert replicas["Master"]["succeeded"] == 1 and replicas["Worker"]["succeeded"] == 2
    port = next(
        p["containerPort"]
        for p in obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "ports"
        ]
        if p["name"] == "pytorchjob-port"
    )
    for rank, pod in enumerate(("ddp-master-0", "ddp-worker-0", "ddp-worker-1")):
        env = json.loads((data / f"{pod}.json").read_text())
        assert env == {
            "MASTER_ADDR": "ddp-master-0",
            "PET_MASTER_ADDR": "ddp-master-0",
            "MASTER_PORT": str(port),
            "PET_MASTER_PORT": str(port),
            "WORLD_SIZE": "6",
            "RANK": str(rank),
            "PET_NODE_RANK": str(rank),
            "PET_NNODES": "3",
            "PET_NPROC_PER_NODE": "2",
            "PYTHONUNBUFFERED": "1",
            "resolved": "127.0.0.1",
        }
        labels = cluster.get("", "pods", "default", pod)["metadata"]["labels"]
        assert labels["training.kubeflow.org/job-name"] == "ddp"
        assert labels["training.kubeflow.org/replica-type"] == pod.split("-")[1]
        assert labels["training.kubeflow.org/replica-index"] == pod[-1]
        assert cluster.get("", "services", "default", pod)["spec"]["clusterIP"] == "None"
    assert labels_of(cluster, "ddp-master-0").get("training.kubeflow.org/job-role") == "master"


def labels_of(cluster: StandIn, pod: str) -> dict[str, str]:
    return dict(cluster.get("", "pods", "default", pod)["metadata"]["labels"])


def test_a_suspended_pytorchjob_has_no_pods_until_resumed(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    pvc(cluster)
    kubectl.apply(pytorchjob("later", suspend=True))
    suspended = wait_for(
        lambda: condition(kubectl.json("get", "pytorchjob", "later"), "Suspended"), 30, "Suspended"
    )
    assert suspended["status"] == "True" and suspended["reason"] == "PyTorchJobSuspended"
    time.sleep(1)
    assert not pods_of(cluster, "later")
    kubectl.run(
        "patch",
        "pytorchjob",
        "later",
        "--type=merge",
        "-p",
        '{"spec": {"runPolicy": {"suspend": false}}}',
    )
    obj = wait_pytorchjob(kubectl, "later")
    assert condition(obj, "Suspended")["status"] == "False"


def test_services_are_on_loopback_and_their_endpoints_are_published(
    cluster: StandIn, kubectl: Kubectl
) -> None:
    server = (
        "import http.server; http.server.HTTPServer(('127.0.0.1', 19411), "
        "http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "exporter", "labels": {"app": "exporter"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "main",
                        "image": "x",
                        "command": ["python", "-c", server],
                        "ports": [{"name": "metrics", "containerPort": 19411}],
                    }
                ],
            },
        }
    )
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "exporter"},
            "spec": {
                "selector": {"app": "exporter"},
                "ports": [{"port": 80, "targetPort": "metrics"}],
            },
        }
    )
    assert kubectl.json("get", "svc", "exporter")["spec"]["clusterIP"] == "127.0.0.1"
    endpoints = cluster.workdir / "service-endpoints.json"
    found = wait_for(
        lambda: json.loads(endpoints.read_text()).get("default/exporter"),
        30,
        "the Service's endpoint",
    )
    assert found == "http://127.0.0.1:19411/metrics"
    kubectl.run("delete", "pod", "exporter", "--timeout=30s")
    wait_for(
        lambda: "default/exporter" not in json.loads(endpoints.read_text()),
        30,
        "the endpoint to go with its pod",
    )


def test_a_closed_checkout_is_reachable_for_the_pods_user(tmp_path: Path) -> None:
    """A 0700 checkout (what `mktemp -d` makes) behind a 0700 ancestor: the pod's user (1000)
    imports from it and lists it, as from an image; a sibling of the checkout stays hidden."""
    closed = tmp_path / "outer" / "checkout"
    (closed / "pkg").mkdir(parents=True)
    (closed / "pkg" / "probe_module.py").write_text("ANSWER = 42\n")
    (tmp_path / "outer" / "sibling").write_text("secret")
    for directory in (tmp_path / "outer", closed):
        directory.chmod(0o700)
    pod = tmp_path / "pod"
    pod.mkdir()
    (pod / "termination-log").write_text("")
    (pod / "termination-log").chmod(0o666)
    (pod / "hosts").write_text("127.0.0.1 localhost\n")
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[1] + '/pkg'); import probe_module; "
        "print(os.getuid(), probe_module.ANSWER, sorted(os.listdir(sys.argv[1])), "
        "sorted(os.listdir(os.path.dirname(sys.argv[1]))))"
    )
    spec = {
        "root": str(pod),
        "terminationLog": str(pod / "termination-log"),
        "hosts": str(pod / "hosts"),
        "mounts": [],
        "uid": 1000,
        "gid": 1000,
        "groups": [1000],
        "cwd": None,
        "env": {"PATH": "/usr/bin:/bin"},
        "argv": [os.path.realpath(sys.executable), "-I", "-c", script, str(closed)],
        "expose": [os.path.realpath(sys.executable), sys.base_prefix, str(closed)],
    }
    (pod / "podinit.json").write_text(json.dumps(spec))
    podinit = Path(__file__).resolve().parents[2] / "standin" / "podinit.py"
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(podinit), str(pod / "podinit.json")],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(None, 2)[:2] == ["1000", "42"]
    assert done.stdout.strip().endswith("['pkg'] ['checkout']")
    assert oct(closed.stat().st_mode & 0o777) == "0o700"  # the host's checkout is untouched
