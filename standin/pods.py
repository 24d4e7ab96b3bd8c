"""The kubelet stand-in: every pod runs for real, as local processes on this machine ("node"
`standin`, IP 127.0.0.1); the controllers that create pods (controllers.py) run in the same loop.

A pod's container command runs through podinit.py in a mount namespace of its own, as the user its
securityContext names. What becomes of the pod spec:
- `configMap` / `secret` volumes: files written from the stand-in's objects, mounted at mountPath;
- `emptyDir`: a fresh directory per pod (also for `medium: Memory`; no size limit);
- `persistentVolumeClaim` NAME: the host directory `<workdir>/pvcs/NAME` (created if missing;
  no PVC object is needed), made group-owned by `fsGroup`; `hostPath`: the path itself;
- env: `value`, `valueFrom` (`secretKeyRef`, `configMapKeyRef`, `fieldRef`), `envFrom`; a missing
  Secret or key keeps the container waiting with CreateContainerConfigError, as a kubelet does;
- the image is not used: `python`/`torchrun`/any name found in the project's .venv/bin runs from
  there (the image-less local environment); PATH starts with .venv/bin;
- /etc/hosts maps the pod's own name and every Service and PyTorchJob replica name of its
  namespace (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) to 127.0.0.1;
- exit: the exit code (128+signal when killed) and /dev/termination-log (or the log tail with
  `FallbackToLogsOnError`) land in `containerStatuses[].state.terminated`; restartPolicy Always /
  OnFailure restart the container in place (restartCount), Never leaves the pod Succeeded/Failed;
- deletion: SIGTERM to the container's main process, SIGKILL to its process group after the
  grace period (or once the main process is gone), then the pod object is removed.
Services: each maps to 127.0.0.1 (`spec.clusterIP`); `<workdir>/service-endpoints.json` maps
`"namespace/name"` to `http://127.0.0.1:<targetPort>/metrics` of a running selected pod, the
format of the operator's `KUBETRAIN_METRICS_ENDPOINTS`.
Not emulated: images, resource requests/limits, probes, init containers, sidecars, a network per
pod (pods share the host's: two pods listening on one port collide, as hostNetwork pods do).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .apiserver import Obj, StandInAPIServer, now_iso

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PODINIT = Path(__file__).with_name("podinit.py")
NODE = "standin"
LOG_TAIL_BYTES = 2048


class NotReady(Exception):
    """The container cannot start yet (reason, message), e.g. a Secret is missing."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Container:
    """One running pod (its single container) on the stand-in node."""

    namespace: str
    name: str
    uid: str
    proc: subprocess.Popen[bytes]
    directory: Path
    started: str
    restarts: int = 0
    term_sent: float | None = None
    killed: bool = False
    log_file: Any = None
    ports: dict[str, int] = field(default_factory=dict)


class PodRunner:
    def __init__(self, server: StandInAPIServer, workdir: Path) -> None:
        if os.geteuid() != 0:
            raise PermissionError(
                "the stand-in's pod runner needs root: each pod gets a mount "
                "namespace (unshare) and runs as its runAsUser"
            )
        self.server = server
        self.workdir = workdir
        self.running: dict[str, Container] = {}  # by pod uid
        self.finished: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        from .controllers import Controllers

        self.controllers = Controllers(server)
        (workdir / "pvcs").mkdir(parents=True, exist_ok=True)
        (workdir / "pods").mkdir(parents=True, exist_ok=True)
        self.endpoints_file = workdir / "service-endpoints.json"
        self.endpoints_file.write_text("{}")
        server.kubelet = self

    async def start(self) -> None:
        self.controllers.install()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for container in list(self.running.values()):
            self._signal_group(container, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.proc.wait(timeout=10)

    # --------------------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        seen = 0
        while True:
            seen = await self.server.wait_changed(seen, 0.25)
            try:
                await self.controllers.reconcile()
                await self._sync_pods()
                self._write_endpoints()
            except Exception:
                log.exception("pod runner pass failed")

    async def _sync_pods(self) -> None:
        for pod in self.server.objects("", "pods"):
            meta = pod["metadata"]
            uid = meta["uid"]
            phase = pod.get("status", {}).get("phase")
            container = self.running.get(uid)
            if meta.get("deletionTimestamp"):
                if container is None:
                    await self._finish_deletion(pod)
                else:
                    self._terminate(container, pod)
            elif container is None and uid not in self.finished and phase == "Pending":
                await self._start(pod)
        for container in list(self.running.values()):
            code = container.proc.poll()
            if code is not None:
                await self._exited(container, code)

    # ------------------------------------------------------------------------------ start

    async def _start(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        directory = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        try:
            launch = self._prepare(pod, directory)
        except NotReady as waiting:
            await self._status(
                pod,
                {
                    "phase": "Pending",
                    "containerStatuses": [
                        self._container_status(
                            pod, {"waiting": {"reason": waiting.reason, "message": waiting.message}}
                        )
                    ],
                },
            )
            return
        log_file = (directory / "container.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(PODINIT), str(directory / "podinit.json")],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=launch,
        )
        started = now_iso()
        container = Container(
            meta["namespace"],
            meta["name"],
            meta["uid"],
            proc,
            directory,
            started,
            log_file=log_file,
            ports=_named_ports(spec),
        )
        previous = next((c for c in self.running.values() if c.uid == meta["uid"]), None)
        if previous is not None:
            container.restarts = previous.restarts
        self.running[meta["uid"]] = container
        if not spec.get("nodeName"):
            await self._bind(pod)
        await self._running_status(pod, container)

    async def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(Exception):
            await self.server.write(
                "merge",
                "",
                "pods",
                meta["namespace"],
                {"spec": {"nodeName": NODE}},
                name=meta["name"],
            )

    def _prepare(self, pod: Obj, directory: Path) -> dict[str, str]:
        meta, spec = pod["metadata"], pod.get("spec", {})
        containers = spec.get("containers") or []
        if not containers:
            raise NotReady("CreateContainerConfigError", "the pod has no containers")
        container = containers[0]
        ns = meta["namespace"]
        directory.mkdir(parents=True, exist_ok=True)
        volumes_dir = directory / "volumes"
        security = {
            **(spec.get("securityContext") or {}),
            **(container.get("securityContext") or {}),
        }
        uid, gid = security.get("runAsUser"), security.get("runAsGroup")
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        sources: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            sources[volume["name"]] = self._volume(ns, volume, volumes_dir, uid, gid, fs_group)
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in sources:
                raise NotReady(
                    "CreateContainerConfigError",
                    f'volume "{mount["name"]}" is not declared in the pod',
                )
            source = sources[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            mounts.append(
                {
                    "source": str(source),
                    "target": mount["mountPath"],
                    "readOnly": bool(mount.get("readOnly")),
                }
            )
        termination = directory / "termination-log"
        termination.write_text("")
        os.chmod(termination, 0o666)
        hosts = directory / "hosts"
        hosts.write_text(self._hosts(ns, meta["name"], spec))
        env = self._env(pod, container)
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if not argv:
            raise NotReady(
                "CreateContainerConfigError",
                "the stand-in runs no images: the container needs a command",
            )
        argv[0] = _local_executable(argv[0])
        config = {
            "root": str(directory),
            "terminationLog": str(termination),
            "hosts": str(hosts),
            "mounts": mounts,
            "uid": uid,
            "gid": gid if gid is not None else uid,
            "groups": [
                g
                for g in {gid, fs_group, *(security.get("supplementalGroups") or [])}
                if g is not None
            ],
            "cwd": container.get("workingDir"),
            "env": env,
            "argv": argv,
            # the image-less environment the command runs with: interpreter, venv, repository
            "expose": [os.path.realpath(sys.executable), sys.base_prefix, str(VENV_BIN), str(ROOT)],
        }
        (directory / "podinit.json").write_text(json.dumps(config, indent=1))
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _volume(self, ns: str, volume: Obj, base: Path, uid: Any, gid: Any, fs_group: Any) -> Path:
        name = volume["name"]
        path = base / name
        owner_gid = fs_group if fs_group is not None else gid
        if "emptyDir" in volume:
            path.mkdir(parents=True, exist_ok=True)
            _own(path, uid, owner_gid, 0o2777 if fs_group is not None else 0o777)
            return path
        if "configMap" in volume or "secret" in volume:
            is_secret = "secret" in volume
            ref = volume["secret"] if is_secret else volume["configMap"]
            obj_name = ref.get("secretName") if is_secret else ref.get("name")
            obj = self.server.get("", "secrets" if is_secret else "configmaps", ns, obj_name)
            if obj is None:
                if ref.get("optional"):
                    path.mkdir(parents=True, exist_ok=True)
                    return path
                kind = "secret" if is_secret else "configmap"
                raise NotReady(
                    "ContainerCreating",
                    f'MountVolume.SetUp failed for volume "{name}" : {kind} "{obj_name}" not found',
                )
            data = (
                {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                if is_secret
                else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            )
            if not is_secret:
                data.update(
                    {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
                )
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            items = ref.get("items")
            chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
            mode = ref.get("defaultMode", 0o644)
            for key, target in chosen.items():
                file = path / target
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(data.get(key, b""))
                os.chmod(file, mode)
                if owner_gid is not None:
                    os.chown(file, 0, owner_gid)
            os.chmod(path, 0o755)
            return path
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            path = self.workdir / "pvcs" / claim
            path.mkdir(parents=True, exist_ok=True)
            if owner_gid is not None:  # fsGroup: group ownership and setgid dirs, as a kubelet does
                for item in [path, *path.rglob("*")]:
                    with contextlib.suppress(OSError):
                        os.chown(item, -1, owner_gid)
                        mode = item.stat().st_mode
                        os.chmod(item, mode | 0o060 | (0o2010 if item.is_dir() else 0))
            return path
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        raise NotReady(
            "CreateContainerConfigError",
            f'volume "{name}": the stand-in supports configMap, secret, emptyDir, '
            "persistentVolumeClaim and hostPath volumes",
        )

    def _env(self, pod: Obj, container: Obj) -> dict[str, str]:
        meta = pod["metadata"]
        ns = meta["namespace"]
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": pod.get("spec", {}).get("hostname") or meta["name"],
        }
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source or "configMapRef" in source:
                is_secret = "secretRef" in source
                ref = source["secretRef" if is_secret else "configMapRef"]
                obj = self.server.get("", "secrets" if is_secret else "configmaps", ns, ref["name"])
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise NotReady(
                        "CreateContainerConfigError",
                        f'{"secret" if is_secret else "configmap"} "{ref["name"]}" not found',
                    )
                for key, value in (obj.get("data") or {}).items():
                    env[prefix + key] = base64.b64decode(value).decode() if is_secret else value
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = _expand(str(item["value"]), env)
            elif "valueFrom" in item:
                found = self._value_from(pod, item["valueFrom"])
                if found is not None:
                    env[item["name"]] = found
            else:
                env[item["name"]] = ""
        return env

    def _value_from(self, pod: Obj, source: Obj) -> str | None:
        ns = pod["metadata"]["namespace"]
        for kind, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if kind in source:
                ref = source[kind]
                obj = self.server.get("", plural, ns, ref["name"])
                data = (obj or {}).get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    what = "secret" if plural == "secrets" else "configmap"
                    missing = (
                        f'{what} "{ref["name"]}" not found'
                        if obj is None
                        else f"couldn't find key {ref['key']} in {what.capitalize()} "
                        f"{ns}/{ref['name']}"
                    )
                    raise NotReady("CreateContainerConfigError", missing)
                value = data[ref["key"]]
                return base64.b64decode(value).decode() if plural == "secrets" else value
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": pod["metadata"]["name"],
                "metadata.namespace": ns,
                "metadata.uid": pod["metadata"]["uid"],
                "spec.nodeName": NODE,
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
                "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
            }
            if path.startswith("metadata.labels['"):
                return (pod["metadata"].get("labels") or {}).get(path[17:-2], "")
            return fields.get(path, "")
        return None

    def _hosts(self, ns: str, name: str, spec: Obj) -> str:
        names = [name]
        if spec.get("hostname"):
            names.append(spec["hostname"])
            if spec.get("subdomain"):
                names += [
                    f"{spec['hostname']}.{spec['subdomain']}",
                    f"{spec['hostname']}.{spec['subdomain']}.{ns}.svc.cluster.local",
                ]
        for svc in self.server.objects("", "services", ns):
            svc_name = svc["metadata"]["name"]
            names += [
                svc_name,
                f"{svc_name}.{ns}",
                f"{svc_name}.{ns}.svc",
                f"{svc_name}.{ns}.svc.cluster.local",
            ]
        return "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n" + "".join(
            f"127.0.0.1\t{n}\n" for n in dict.fromkeys(names)
        )

    # -------------------------------------------------------------------------- statuses

    def _container_status(
        self, pod: Obj, state: Obj, restarts: int = 0, last: Obj | None = None
    ) -> Obj:
        container = (pod.get("spec", {}).get("containers") or [{}])[0]
        status = {
            "name": container.get("name", ""),
            "image": container.get("image", ""),
            "imageID": "",
            "ready": "running" in state,
            "started": "running" in state,
            "restartCount": restarts,
            "state": state,
            "lastState": last or {},
        }
        return status

    async def _status(self, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        status = {
            **status,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
        }
        with contextlib.suppress(Exception):  # the pod may be gone meanwhile
            current = self.server.get("", "pods", meta["namespace"], meta["name"])
            if current is None or current["metadata"]["uid"] != meta["uid"]:
                return
            merged = {**current.get("status", {}), **status}
            await self.server.write(
                "update",
                "",
                "pods",
                meta["namespace"],
                {**current, "status": merged},
                name=meta["name"],
                sub="status",
            )

    def _conditions(self, ready: bool, stamp: str) -> list[Obj]:
        value = "True" if ready else "False"
        return [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": value, "lastTransitionTime": stamp},
            {"type": "Ready", "status": value, "lastTransitionTime": stamp},
        ]

    async def _running_status(self, pod: Obj, container: Container) -> None:
        await self._status(
            pod,
            {
                "phase": "Running",
                "startTime": pod.get("status", {}).get("startTime") or container.started,
                "conditions": self._conditions(True, container.started),
                "containerStatuses": [
                    self._container_status(
                        pod,
                        {"running": {"startedAt": container.started}},
                        container.restarts,
                        pod.get("status", {}).get("containerStatuses", [{}])[0].get("lastState"),
                    )
                ],
            },
        )

    async def _exited(self, container: Container, code: int) -> None:
        exit_code = code if code >= 0 else 128 - code
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.proc.pid, signal.SIGKILL)  # what is left of the container
        container.log_file.close()
        del self.running[container.uid]
        pod = next(
            (
                p
                for p in self.server.objects("", "pods", container.namespace)
                if p["metadata"]["uid"] == container.uid
            ),
            None,
        )
        if pod is None:
            self.finished.add(container.uid)
            return
        spec = pod.get("spec", {})
        spec_container = (spec.get("containers") or [{}])[0]
        message = (container.directory / "termination-log").read_text(errors="replace")[:4096]
        if (
            not message
            and exit_code != 0
            and spec_container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            tail = (container.directory / "container.log").read_bytes()[-LOG_TAIL_BYTES:]
            message = b"\n".join(tail.splitlines()[-80:]).decode(errors="replace")
        terminated: Obj = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": container.started,
            "finishedAt": now_iso(),
            "containerID": f"standin://{container.proc.pid}",
        }
        if message:
            terminated["message"] = message
        if exit_code >= 128 and container.killed:
            terminated["signal"] = exit_code - 128
        policy = spec.get("restartPolicy", "Always")
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        restart = not deleting and (policy == "Always" or (policy == "OnFailure" and exit_code))
        if restart:
            await asyncio.sleep(1)  # the kubelet's first back-off step, shortened
            await self._status(
                pod,
                {
                    "phase": "Pending",
                    "containerStatuses": [
                        self._container_status(
                            pod,
                            {"waiting": {"reason": "ContainerCreating"}},
                            container.restarts + 1,
                            {"terminated": terminated},
                        )
                    ],
                },
            )
            fresh = self.server.get("", "pods", container.namespace, container.name)
            if fresh is not None:
                await self._start(fresh)
                if fresh["metadata"]["uid"] in self.running:
                    self.running[fresh["metadata"]["uid"]].restarts = container.restarts + 1
            return
        self.finished.add(container.uid)
        phase = "Succeeded" if exit_code == 0 else "Failed"
        await self._status(
            pod,
            {
                "phase": phase,
                "conditions": self._conditions(False, terminated["finishedAt"]),
                "containerStatuses": [
                    self._container_status(pod, {"terminated": terminated}, container.restarts)
                ],
            },
        )
        if deleting:
            await self._finish_deletion(
                self.server.get("", "pods", container.namespace, container.name) or pod
            )

    # ---------------------------------------------------------------------------- deletion

    def _signal_group(self, container: Container, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.proc.pid, sig)

    def _terminate(self, container: Container, pod: Obj) -> None:
        now = time.monotonic()
        grace = int(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
        if container.term_sent is None:
            container.term_sent = now
            with contextlib.suppress(ProcessLookupError):
                container.proc.send_signal(signal.SIGTERM)  # the container's main process
            if grace > 0:
                return
        if now - container.term_sent >= grace and not container.killed:
            container.killed = True
            self._signal_group(container, signal.SIGKILL)

    async def _finish_deletion(self, pod: Obj) -> None:
        meta = pod["metadata"]
        current = self.server.get("", "pods", meta["namespace"], meta["name"])
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return
        if current["metadata"].get("finalizers"):
            return
        with contextlib.suppress(Exception):
            await self.server.write(
                "delete",
                "",
                "pods",
                meta["namespace"],
                {"gracePeriodSeconds": 0},
                name=meta["name"],
            )

    def is_running(self, pod: Obj) -> bool:
        return pod["metadata"].get("uid") in self.running

    def kill(self, pod: Obj, *, force: bool) -> None:
        container = self.running.get(pod["metadata"].get("uid", ""))
        if container is not None:
            container.killed = True
            if container.term_sent is None:
                container.term_sent = time.monotonic()
            self._signal_group(container, signal.SIGKILL)

    def log(self, namespace: str | None, name: str) -> str:
        pod = self.server.get("", "pods", namespace, name)
        if pod is None:
            return ""
        meta = pod["metadata"]
        path = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        file = path / "container.log"
        return file.read_text(errors="replace") if file.exists() else ""

    # --------------------------------------------------------------------------- services

    def _write_endpoints(self) -> None:
        mapping: dict[str, str] = {}
        pods = [
            p
            for p in self.server.objects("", "pods")
            if p["metadata"].get("uid") in self.running
            and not p["metadata"].get("deletionTimestamp")
        ]
        for svc in self.server.objects("", "services"):
            selector = (svc.get("spec") or {}).get("selector") or {}
            ns = svc["metadata"]["namespace"]
            chosen = [
                p
                for p in pods
                if p["metadata"]["namespace"] == ns
                and selector
                and all(
                    (p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()
                )
            ]
            ports = (svc.get("spec") or {}).get("ports") or []
            if not chosen or not ports:
                continue
            target = ports[0].get("targetPort", ports[0].get("port"))
            if isinstance(target, str):
                target = _named_ports(chosen[0].get("spec", {})).get(target)
            if target:
                mapping[f"{ns}/{svc['metadata']['name']}"] = f"http://127.0.0.1:{target}/metrics"
        text = json.dumps(mapping, indent=1, sort_keys=True)
        if self.endpoints_file.read_text() != text:
            tmp = self.endpoints_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.endpoints_file)


def _named_ports(spec: Obj) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for c in spec.get("containers") or []
        for p in c.get("ports") or []
        if p.get("name")
    }


def _local_executable(name: str) -> str:
    """The image-less environment: the project's .venv stands in for the image."""
    if "/" in name:
        base = Path(name).name
        local = VENV_BIN / base
        return str(local) if base in ("python", "python3") or local.exists() else name
    local = VENV_BIN / name
    return str(local) if local.exists() else name


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references to earlier variables, as the kubelet expands them."""
    for key, found in env.items():
        value = value.replace(f"$({key})", found)
    return value


def _own(path: Path, uid: Any, gid: Any, mode: int) -> None:
    with contextlib.suppress(OSError):
        os.chown(path, uid if uid is not None else -1, gid if gid is not None else -1)
    os.chmod(path, mode)
