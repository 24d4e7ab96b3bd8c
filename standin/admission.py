"""Admission of custom resources, in the API server's order: decode, prune, default, validate.

The checks themselves are crd_emulation.py (OAS 3.0 validation with openapi-schema-validator,
CEL with cel-python, structural defaulting and pruning ported from apiextensions-apiserver); this
module words their findings as the API server does and applies the field-validation directive
(`Strict`: unknown fields are a 400 `strict decoding error`, `Warn` — the default — prunes them
and returns a `Warning` header, `Ignore` prunes silently).
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import crd_emulation
from .errors import ApiError, Cause, bad_request, invalid, value
from .resources import ResourceType

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SUBDOMAIN_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def name_causes(name: str) -> list[Cause]:
    """metadata.name as the API server checks it for most kinds (a DNS-1123 subdomain)."""
    if not name:
        return [
            Cause(
                "metadata.name",
                "Required value: name or generateName is required",
                "FieldValueRequired",
            )
        ]
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return [Cause("metadata.name", f"Invalid value: {value(name)}: {SUBDOMAIN_HELP}")]
    return []


def admit_custom(
    rt: ResourceType,
    obj: dict[str, Any],
    old: dict[str, Any] | None,
    field_validation: str,
    warnings: list[str],
) -> dict[str, Any]:
    """The object as stored, or an `ApiError` (400 strict decoding, 422 invalid)."""
    schema = rt.schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    pruned, unknown = crd_emulation.prune(obj, schema)
    if unknown and field_validation == "Strict":
        fields = ", ".join(f'unknown field "{path}"' for path in unknown)
        raise bad_request(
            f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
            f"strict decoding error: {fields}"
        )
    if unknown and field_validation != "Ignore":
        warnings += [f'unknown field "{path}"' for path in unknown]
    stored = crd_emulation.apply_defaults(pruned, schema, in_place=True)  # prune copied
    name = stored.get("metadata", {}).get("name", "")
    causes = name_causes(name)
    for error in crd_emulation.schema_errors(
        stored, unknown_fields=False, schema=schema, defaulted=True
    ):
        causes += _schema_causes(error)
    if not causes:
        evaluation = crd_emulation.evaluate_rules(stored, old, schema=schema)
        for failure in evaluation.failures:
            if failure.error is not None:
                message = f"Internal error: rule {failure.rule!r} could not run: {failure.error}"
            else:
                message = f'Invalid value: "object": {failure.message}'
            causes.append(Cause(failure.path, message))
    if causes:
        unique = list({(c.field, c.message): c for c in causes}.values())
        raise invalid(rt, name, unique)
    return stored


def _schema_causes(found: Any) -> list[Cause]:
    error = found.error
    path = found.path
    if error is None:  # a duplicate in a list-type: set
        return [Cause(path, "Duplicate value", "FieldValueDuplicate")]
    keyword = error.validator
    instance = error.instance
    limit = error.validator_value
    shown = value(instance)
    if keyword == "required":
        present = instance if isinstance(instance, dict) else {}
        return [
            Cause(crd_emulation.join(path, key), "Required value", "FieldValueRequired")
            for key in limit
            if key not in present
        ]
    if keyword == "enum":
        allowed = ", ".join(json.dumps(v) for v in limit)
        return [
            Cause(
                path,
                f"Unsupported value: {shown}: supported values: {allowed}",
                "FieldValueNotSupported",
            )
        ]
    if keyword == "type":
        kind = _json_type(instance)
        return [
            Cause(
                path,
                f'Invalid value: "{kind}": {path} in body must be of type {limit}: "{kind}"',
                "FieldValueTypeInvalid",
            )
        ]
    words = {
        "minimum": f"should be greater than or equal to {limit}",
        "maximum": f"should be less than or equal to {limit}",
        "minLength": f"should be at least {limit} chars long",
        "pattern": f"should match '{limit}'",
        "minItems": f"should have at least {limit} items",
        "minProperties": f"should have at least {limit} properties",
        "multipleOf": f"should be a multiple of {limit}",
    }
    if keyword in ("minimum", "maximum") and "exclusive" in error.message:
        words[keyword] = f"should be {'greater' if keyword == 'minimum' else 'less'} than {limit}"
    if keyword in words:
        shown = str(len(instance)) if keyword in ("minItems", "minProperties") else shown
        return [Cause(path, f"Invalid value: {shown}: {path} in body {words[keyword]}")]
    if keyword == "maxLength":
        return [Cause(path, f"Too long: may not be more than {limit} bytes", "FieldValueTooLong")]
    if keyword in ("maxItems", "maxProperties"):
        what = "items" if keyword == "maxItems" else "properties"
        return [
            Cause(
                path,
                f"Too many: {len(instance)}: must have at most {limit} {what}",
                "FieldValueTooMany",
            )
        ]
    return [Cause(path, f"Invalid value: {shown}: {error.message}")]


def _json_type(instance: Any) -> str:
    if isinstance(instance, bool):
        return "boolean"
    if isinstance(instance, int):
        return "integer"
    if isinstance(instance, float):
        return "number"
    if isinstance(instance, str):
        return "string"
    if isinstance(instance, list):
        return "array"
    if instance is None:
        return "null"
    return "object"


__all__ = ["ApiError", "admit_custom", "name_causes"]
