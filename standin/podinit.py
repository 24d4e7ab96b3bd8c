"""Inside a stand-in pod, before its command: a mount namespace of its own, then exec.

Run by the kubelet stand-in (pods.py) as `python podinit.py SPEC.json`, already in a new session.
It unshares the mount namespace (root needed), makes every mount private, builds the pod's /dev
(null, zero, full, random, urandom, tty, fd links, /dev/shm, and /dev/termination-log bound to a
host file the kubelet reads after exit), bind-mounts each volume at its mountPath (read-only where
asked), keeps the image-less environment reachable under those volumes, binds the pod's
/etc/hosts, drops to runAsUser/runAsGroup with fsGroup as supplementary group, asks for SIGKILL
when the kubelet goes, and execs the container's command. Standard library only: it runs before
anything else in the pod.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    _check(
        libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {source} on {target}",
    )


def bind(source: str, target: str, read_only: bool = False) -> None:
    """Bind `source` (a path or an O_PATH descriptor's /proc/self/fd link) at `target`."""
    dst = Path(target)
    if os.path.isdir(source):
        dst.mkdir(parents=True, exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.touch()
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def pinned(path: str) -> str:
    """A path that still reaches `path` after mounts shadow it (e.g. an emptyDir on /tmp)."""
    return f"/proc/self/fd/{os.open(path, os.O_PATH)}"


def _allowed(path: str, uid: int, groups: list[int], bits: int) -> bool:
    """Whether `uid` (with `groups`) has the permission `bits` (o-style: 1 traverse, 4 list) on
    `path`, as the kernel picks owner, group or other."""
    info = os.stat(path)
    if info.st_uid == uid:
        return info.st_mode >> 6 & bits == bits
    if info.st_gid in groups:
        return info.st_mode >> 3 & bits == bits
    return info.st_mode & bits == bits


def expose(paths: list[str], uid: int | None, groups: list[int]) -> None:
    """Let the pod's user reach `paths` as an image would hold them, through ancestors it may not
    traverse (e.g. a 0700 /root holding the interpreter): such an ancestor gets an empty tmpfs in
    this namespace with only the needed entries bound back in, so nothing else in it is visible.
    A directory of `paths` that is itself closed (a 0700 `mktemp -d` checkout) is opened the same
    way, with all of its entries bound back."""
    if uid in (None, 0):
        return
    needed: dict[str, set[str]] = {}
    for path in paths:
        parts = Path(path).resolve().parts
        for depth in range(1, len(parts) - 1):
            ancestor = os.path.join(*parts[: depth + 1])
            if not _allowed(ancestor, uid, groups, 0o1):
                needed.setdefault(ancestor, set()).add(parts[depth + 1])
        whole = os.path.join(*parts)
        if os.path.isdir(whole) and not _allowed(whole, uid, groups, 0o5):
            needed.setdefault(whole, set()).update(os.listdir(whole))
    pins = {(a, c): pinned(os.path.join(a, c)) for a, cs in needed.items() for c in cs}
    for ancestor in sorted(needed, key=len):
        mount("tmpfs", ancestor, "tmpfs", 0)
        os.chmod(ancestor, 0o755)
        for child in sorted(needed[ancestor]):
            bind(pins[(ancestor, child)], os.path.join(ancestor, child))


def keep_reachable(environment: dict[str, str], targets: list[str]) -> None:
    """The image-less environment (interpreter, .venv, repository) stays where its paths say, even
    when a volume is mounted over an ancestor (an emptyDir on /tmp, with the checkout in /tmp/…):
    such a path is bound back from the descriptor pinned before the volumes were mounted."""
    restored: list[str] = []
    for path in sorted(environment, key=len):
        if any(path.startswith(done + "/") for done in restored):
            continue
        if any(path.startswith(target.rstrip("/") + "/") for target in targets):
            bind(environment[path], path)
            restored.append(path)


def build_dev(root: Path, termination: str) -> None:
    dev = root / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            (dev / name).touch()
            mount(f"/dev/{name}", str(dev / name), None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        if not (dev / name).is_symlink():
            (dev / name).symlink_to(target)
    (dev / "shm").mkdir(exist_ok=True)
    (dev / "pts").mkdir(exist_ok=True)
    (dev / "termination-log").touch()
    mount(termination, str(dev / "termination-log"), None, MS_BIND)
    mount(str(dev), "/dev", None, MS_BIND | MS_REC)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    sources = [pinned(item["source"]) for item in spec["mounts"]]
    hosts = pinned(spec["hosts"])
    build_dev(Path(spec["root"]), spec["terminationLog"])
    groups = [g for g in spec.get("groups", []) if g is not None]
    expose(spec.get("expose", []), spec.get("uid"), groups)
    # pinned once opened up, so what the volumes shadow comes back reachable
    environment = {path: pinned(path) for path in spec.get("expose", [])}
    for item, source in zip(spec["mounts"], sources, strict=True):
        bind(source, item["target"], item.get("readOnly", False))
    keep_reachable(environment, [item["target"] for item in spec["mounts"]])
    bind(hosts, "/etc/hosts", read_only=True)
    if spec.get("gid") is not None or groups:
        os.setgroups(groups)
    if spec.get("gid") is not None:
        os.setgid(spec["gid"])
    if spec.get("uid") is not None:
        os.setuid(spec["uid"])
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    os.chdir(spec.get("cwd") or "/")
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as error:
        message = f"failed to start container: exec {argv[0]!r}: {error.strerror}"
        Path("/dev/termination-log").write_text(message)
        print(message, file=sys.stderr)
        os._exit(128)


if __name__ == "__main__":
    main()
