"""Discovery (/api, /apis, group versions) and OpenAPI v3, built from the served resource types.

Legacy discovery only: kubectl asks for aggregated discovery first and falls back to the legacy
documents when the answer is plain `application/json`, as against any pre-1.26 server. OpenAPI
v3 documents carry each CRD's `openAPIV3Schema` (with `x-kubernetes-group-version-kind`, so
`kubectl explain` finds it) and a PATCH operation per resource that declares the
`fieldValidation` query parameter — kubectl's query-param verifier looks for exactly that before
it leaves validation to the server.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .resources import VERBS, ResourceType

VERSION = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.0-standin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25",
    "compiler": "gc",
    "platform": "linux/amd64",
}

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
OBJECT_META_SCHEMA: dict[str, Any] = {
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "namespace": {"type": "string", "description": "The namespace of the object."},
        "labels": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Map of string keys and values to organize objects.",
        },
        "annotations": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Unstructured key value map set by tools.",
        },
        "uid": {"type": "string", "description": "Set by the server; unique in time and space."},
        "resourceVersion": {
            "type": "string",
            "description": "The object's internal version, set by the server.",
        },
        "generation": {
            "type": "integer",
            "format": "int64",
            "description": "Incremented on every change of the desired state.",
        },
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "generateName": {"type": "string"},
    },
}


def group_versions(types: list[ResourceType]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for rt in types:
        versions = found.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return found


def api_versions(address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(types: list[ResourceType]) -> dict[str, Any]:
    groups = [_group(g, v) for g, v in sorted(group_versions(types).items()) if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(types: list[ResourceType], name: str) -> dict[str, Any] | None:
    versions = group_versions(types).get(name)
    if not versions or not name:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


def resource_list(types: list[ResourceType], group: str, version: str) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for rt in types:
        if (rt.group, rt.version) != (group, version):
            continue
        entry: dict[str, Any] = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(VERBS),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        resources.append(entry)
        for sub in rt.subresources:
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            resources.append(
                {
                    "name": f"{rt.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": verbs,
                }
            )
    gv = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }


def _schema_name(rt: ResourceType) -> str:
    reversed_group = ".".join(reversed(rt.group.split("."))) if rt.group else "io.k8s.api.core"
    return f"{reversed_group}.{rt.version}.{rt.kind}"


def openapi_document(types: list[ResourceType], group: str, version: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {OBJECT_META: OBJECT_META_SCHEMA}
    paths: dict[str, Any] = {}
    for rt in types:
        if (rt.group, rt.version) != (group, version):
            continue
        gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
        schema = (
            copy.deepcopy(rt.schema)
            if rt.schema
            else {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": f"{rt.kind} (the stand-in serves no schema for built-in kinds)",
            }
        )
        props = schema.setdefault("properties", {}) if rt.schema else {}
        if rt.schema:
            props["metadata"] = {
                "$ref": f"#/components/schemas/{OBJECT_META}",
                "description": "Standard object's metadata.",
            }
        schema["x-kubernetes-group-version-kind"] = [gvk]
        schemas[_schema_name(rt)] = schema
        prefix = f"/apis/{rt.group}/{rt.version}" if rt.group else "/api/v1"
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        ref = {"$ref": f"#/components/schemas/{_schema_name(rt)}"}
        ok = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}
        params = [
            {
                "name": "fieldValidation",
                "in": "query",
                "schema": {"type": "string"},
                "description": "Strict, Warn or Ignore: what to do with unknown fields.",
            },
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
        ]
        operation = {"x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": ok}
        paths[f"{prefix}{scope}/{rt.plural}/{{name}}"] = {
            "get": {"x-kubernetes-group-version-kind": gvk, "responses": ok},
            "put": operation,
            "patch": operation,
        }
        paths[f"{prefix}{scope}/{rt.plural}"] = {"post": operation}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (stand-in)", "version": VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_root(types: list[ResourceType]) -> dict[str, Any]:
    paths = {}
    for group, versions in group_versions(types).items():
        for version in versions:
            key = f"apis/{group}/{version}" if group else "api/v1"
            doc = json.dumps(openapi_document(types, group, version), sort_keys=True)
            digest = hashlib.sha256(doc.encode()).hexdigest()[:32].upper()
            paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest}"}
    return {"paths": paths}
