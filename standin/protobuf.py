"""Decoding the protobuf bodies kubectl sends for `kubectl create secret|configmap|namespace|
serviceaccount` (typed clients prefer `application/vnd.kubernetes.protobuf`).

Only those kinds, and only the fields such commands set: the `k8s\\0` envelope
(runtime.Unknown), ObjectMeta (name, generateName, namespace, labels, annotations, finalizers,
ownerReferences) and the kinds' own fields, by the field numbers of k8s.io/api's generated.proto.
Anything else is a 415 (errors.unsupported_media): send JSON or YAML (`kubectl apply -f`).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

MAGIC = b"k8s\x00"


class Undecodable(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise Undecodable("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value): ints for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise Undecodable(f"wire type {wire}")
        yield number, value


def _map(entries: list[bytes], binary: bool = False) -> dict[str, str]:
    found = {}
    for entry in entries:
        parts = dict(fields(entry))
        key = parts.get(1, b"").decode()
        raw = parts.get(2, b"")
        found[key] = base64.b64encode(raw).decode() if binary else raw.decode()
    return found


def _grouped(data: bytes) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = {}
    for number, value in fields(data):
        grouped.setdefault(number, []).append(value)
    return grouped


def _meta(data: bytes) -> dict[str, Any]:
    parts = _grouped(data)
    meta: dict[str, Any] = {}
    for number, key in ((1, "name"), (2, "generateName"), (3, "namespace")):
        if number in parts:
            meta[key] = parts[number][-1].decode()
    if 11 in parts:
        meta["labels"] = _map(parts[11])
    if 12 in parts:
        meta["annotations"] = _map(parts[12])
    if 14 in parts:
        meta["finalizers"] = [v.decode() for v in parts[14]]
    refs = []
    for raw in parts.get(13, []):
        ref = _grouped(raw)
        refs.append(
            {
                k: ref[n][-1].decode()
                for n, k in ((5, "apiVersion"), (1, "kind"), (3, "name"), (4, "uid"))
                if n in ref
            }
            | {
                k: bool(ref[n][-1])
                for n, k in ((6, "controller"), (7, "blockOwnerDeletion"))
                if n in ref
            }
        )
    if refs:
        meta["ownerReferences"] = refs
    return meta


def decode(body: bytes) -> dict[str, Any]:
    if not body.startswith(MAGIC):
        raise Undecodable("no k8s protobuf envelope")
    unknown = _grouped(body[len(MAGIC) :])
    type_meta = dict(fields(unknown.get(1, [b""])[-1]))
    api_version = type_meta.get(1, b"").decode()
    kind = type_meta.get(2, b"").decode()
    parts = _grouped(unknown.get(2, [b""])[-1])
    obj: dict[str, Any] = {
        "apiVersion": api_version or "v1",
        "kind": kind,
        "metadata": _meta(parts.get(1, [b""])[-1]),
    }
    if kind == "Secret":
        obj["data"] = _map(parts.get(2, []), binary=True)
        if 3 in parts:
            obj["type"] = parts[3][-1].decode()
        if 4 in parts:
            obj["stringData"] = _map(parts[4])
        if 5 in parts:
            obj["immutable"] = bool(parts[5][-1])
    elif kind == "ConfigMap":
        obj["data"] = _map(parts.get(2, []))
        if 3 in parts:
            obj["binaryData"] = _map(parts[3], binary=True)
        if 4 in parts:
            obj["immutable"] = bool(parts[4][-1])
    elif kind == "Namespace":
        spec = _grouped(parts.get(2, [b""])[-1])
        obj["spec"] = {"finalizers": [v.decode() for v in spec.get(1, [])]}
    elif kind == "ServiceAccount":
        obj["secrets"] = [{"name": dict(fields(s)).get(3, b"").decode()} for s in parts.get(2, [])]
    else:
        raise Undecodable(f"the stand-in decodes no protobuf {kind or 'object'}")
    return obj
