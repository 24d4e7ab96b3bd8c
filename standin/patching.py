"""The three PATCH formats as the API server applies them.

- JSON patch (RFC 6902): the `jsonpatch` library; a failed `test` op is HTTP 422, as in
  apiserver's `jsonPatcher` (Kopf relies on it for its resourceVersion-guarded finalizer patch).
- JSON merge patch (RFC 7386): `null` deletes, objects merge, lists are replaced.
- Strategic merge patch, built-in kinds only (custom resources refuse it with 415, as the API
  server does): lists with a patch merge key merge item by item; `$patch: delete|replace`
  and `$setElementOrder`/`$retainKeys` directives are honoured as far as kubectl sends them.
  The merge keys are those of k8s.io/api for the fields our objects carry.
"""

from __future__ import annotations

from typing import Any

import jsonpatch

from .resources import clone

# field name -> patch merge key (k8s.io/api `patchMergeKey` tags of the fields we use)
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "secrets": "name",
}
# lists merged as sets of scalars (patchStrategy: merge without a key)
MERGE_SETS = {"finalizers"}


class PatchError(Exception):
    """The patch cannot be applied: `code` is what the API server answers (422 or 400)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def json_patch(obj: dict[str, Any], ops: Any) -> dict[str, Any]:
    if not isinstance(ops, list):
        raise PatchError(400, "json patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(obj, ops, in_place=True)  # obj: the caller's copy
    except jsonpatch.JsonPatchTestFailed as error:
        raise PatchError(422, f"the server rejected our request due to an error: {error}") from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise PatchError(422, str(error)) from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, into `target` itself (a copy the caller owns: one copy per write, not one per
    level of the patch)."""
    if not isinstance(patch, dict):
        return clone(patch)
    result = target if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, field: str = "") -> Any:
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: clone(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        result = clone(target) if isinstance(target, dict) else {}
        retain = patch.get("$retainKeys")
        for key, value in patch.items():
            if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
                continue
            if key.startswith("$deleteFromPrimitiveList/"):
                name = key.split("/", 1)[1]
                result[name] = [v for v in result.get(name, []) if v not in value]
                continue
            if value is None:
                result.pop(key, None)
                continue
            merged = strategic_merge_patch(result.get(key), value, key)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        if isinstance(retain, list):
            result = {k: v for k, v in result.items() if k in retain}
        return result
    if isinstance(patch, list):
        if field in MERGE_SETS and isinstance(target, list):
            return list(target) + [v for v in patch if v not in target]
        key = MERGE_KEYS.get(field)
        if key is None or not isinstance(target, list):
            return [item for item in (strip_directives(i) for i in patch) if item is not None]
        return _merge_keyed(target, patch, key)
    return clone(patch)


def _merge_keyed(target: list[Any], patch: list[Any], key: str) -> list[Any]:
    result = clone(target)
    for item in patch:
        if not isinstance(item, dict):
            continue
        if item.get("$patch") == "replace":
            return [strip_directives(i) for i in patch if i.get("$patch") != "replace"]
        index = next((n for n, old in enumerate(result) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
            continue
        if index is None:
            result.append(strip_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("$patch") == "delete":
            return None
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return value
