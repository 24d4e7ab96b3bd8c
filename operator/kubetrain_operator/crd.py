"""The TrainingRun CustomResourceDefinition, generated from the API model — one source of truth.

`crds/trainingruns.kubetrain.dev.yaml` (and the chart's copy) is the output of :func:`crd_yaml`;
a test fails when the committed file is stale (`make crd` rewrites it). The spec schema is
`TrainingRunSpec.model_json_schema(by_alias=True)` turned into a Kubernetes *structural* schema, and
so is the status schema, from `run_status.TrainingRunStatus`:

- every `$ref` inlined; `Optional[X]` becomes plain `X` (the API server prunes `null` from fields
  that are not `nullable`, so the model's `None` and an absent field mean the same); `const`
  becomes `enum`; JSON Schema 2020's numeric `exclusiveMinimum` becomes OpenAPI 3.0's `minimum` +
  `exclusiveMinimum: true`; `additionalProperties: false` is dropped (a structural schema may not
  set it: the API server prunes unknown fields, or refuses them under strict field validation);
- defaults are carried over, `default_factory` ones included: a section that defaults to its own
  defaults becomes `default: {}`, so the API server fills in its fields and `kubectl get -o yaml`
  shows what the run really uses; empty lists and maps get no default (absent means empty);
- a description on every field and every object, from the model's docstrings. Generation fails
  when one is missing: `kubectl explain trainingrun.spec.…` is the user's manual;
- URI strings (`api.Uri`, `api.ModelUri`, `api.Endpoint`, marked `x-kubetrain-uri` in the
  model's schema) get their kind's field rules (`rules.FIELD_RULES`) as CEL; quantities are
  `x-kubernetes-int-or-string` with the quantity pattern, as in Kubernetes.

Every rule of the one table (`rules.RULES`, `rules.RUNG_RULES`) that has CEL is attached where
it applies, so `kubectl apply` refuses what `kubetrain validate` refuses; the operator still
re-validates everything. Rules rely on the API server's defaulting, which always runs before
validation: a field with a default is never absent when a rule reads it. The API server compiles
every rule when the CRD is created and exposes to CEL only typed schema nodes (apiserver
`pkg/cel/common/schemas.go`, `SchemaDeclType`), so no rule reads an untyped node and every string
and list a rule touches is bounded (tests/operator/test_crd.py checks both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from kubetrain_operator import rules
from kubetrain_operator.api import (
    API_GROUP,
    API_VERSION,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    URI_KIND_KEY,
    TrainingRunSpec,
)
from kubetrain_operator.rules import IMMUTABLE_SECTIONS
from kubetrain_operator.run_status import TrainingRunStatus

Schema = dict[str, Any]

SINGULAR = "trainingrun"
SHORT_NAMES = ["tr"]
#: `kubectl get kubetrain` lists runs. Not in `all`: by convention that category holds the core
#: workload kinds, and a run's Jobs and PyTorchJobs already show there.
CATEGORIES = ["kubetrain"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

HEADER = (
    "# Generated from operator/kubetrain_operator/api.py (spec) and run_status.py (status) by "
    "`kubetrain crd`: do not edit.\n"
    "# Change the model (or crd.py) and run `make crd`; tests/operator/test_crd.py fails when "
    "stale.\n"
)


class CRDGenerationError(RuntimeError):
    """The model cannot be expressed as a structural schema (or lacks a description)."""


# ------------------------------------------------------------------------------------- CEL rules


@dataclass(frozen=True)
class Rule:
    """One `x-kubernetes-validations` entry, attached at `at` (a dotted path from the root)."""

    at: str
    rule: str
    message: str
    field_path: str | None = None

    def render(self) -> Schema:
        out: Schema = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        return out


def _field_path(rule: rules.Rule) -> str | None:
    """The rule's field relative to its node; none at the root for metadata (the schema does not
    declare metadata's fields, and a fieldPath must resolve in it)."""
    if not rule.field or rule.field.startswith("metadata."):
        return None
    return "." + rule.field


def cel_rules() -> tuple[Rule, ...]:
    """Every rule of the table that CEL can state, plus the immutability (transition) rules."""
    out = [
        Rule(
            f"spec.{name}",
            "self == oldSelf",
            f"spec.{name} is immutable once the run exists — create a new TrainingRun instead",
        )
        for name in IMMUTABLE_SECTIONS
    ]
    for rule in rules.RULES:
        if rule.cel is not None:
            out.append(Rule(rule.at, rule.cel, rule.text, _field_path(rule)))
    for rung in rules.RUNG_RULES:
        for text, field_path in rung.cel_rules():
            message = f"spec{field_path}: {rung.message} — {rung.fix}"
            out.append(Rule("spec", text, message, field_path))
    return tuple(out)


#: On every quantity (int-or-string): what api.Quantity refuses beyond the pattern.
QUANTITY_RULE = Rule(
    "",
    "type(self) == string || self >= 0",
    "a quantity cannot be negative — write e.g. 8 or 48Gi",
)


def field_rules(kind: str) -> tuple[Rule, ...]:
    """The CEL rules on every string of a URI kind (rules.FIELD_RULES)."""
    return tuple(Rule("", r.cel, f"{r.message} — {r.fix}") for r in rules.FIELD_RULES[kind])


#: Kubernetes list semantics the model states in Python: duplicates are refused by the API server.
LIST_TYPES = {
    "spec.tokenizer.train.specialTokens": "set",
    "spec.data.train": "set",
    "spec.data.validation": "set",
}


# ------------------------------------------------------------------------ JSON schema → structural


class _WithFactoryDefaults(GenerateJsonSchema):
    """pydantic leaves `default_factory` defaults out of the schema; the CRD wants them."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            # `{}` plus the nested defaults is the same object, and reads better in the CRD.
            return value.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if value in ([], {}):
            return NoDefault
        return value


#: Every key of the output, in this order (a stable, readable order for the generated YAML).
_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "anyOf",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
)
#: Keys `_structural` copies as they are: every output key but those it translates or adds itself.
_SCALAR_KEYS = frozenset(_ORDER) - {
    "description",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "x-kubernetes-validations",
}


def _resolve(node: Schema, defs: Schema, where: str) -> Schema:
    """Inline `$ref` and unwrap `Optional[X]`; the referring node's keys win (its description)."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        node = {**_resolve(defs[ref.rsplit("/", 1)[-1]], defs, where), **node}
    for junctor in ("anyOf", "oneOf", "allOf"):
        branches = node.pop(junctor, None)
        if branches is None:
            continue
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) != 1:
            raise CRDGenerationError(
                f"{where}: a union of {len(kept)} types has no structural schema — use one type"
            )
        node = {**_resolve(kept[0], defs, where), **node}
    if "default" in node and node["default"] is None:
        del node["default"]  # Optional[X] = None: absent is the default, and CRDs have no null
    return node


def _structural(node: Schema, defs: Schema, where: str, *, is_field: bool = True) -> Schema:
    """One node of the model's JSON schema as a structural OpenAPI v3.0 schema."""
    node = _resolve(node, defs, where)
    node.pop("title", None)
    description = node.get("description")
    if description:
        node["description"] = description = " ".join(description.split())
    if (is_field or node.get("type") == "object") and not description:
        raise CRDGenerationError(
            f"{where} has no description — add a docstring under the field (or the class) in api.py"
        )
    uri_kind = node.pop(URI_KIND_KEY, None)
    out: Schema = {}
    if description:
        out["description"] = description
    for key, value in node.items():
        if key == "description":
            continue
        if key in _SCALAR_KEYS:
            out[key] = copy.deepcopy(value)
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        elif key == "uniqueItems":
            if value:
                out["x-kubernetes-list-type"] = "set"  # uniqueItems is forbidden in CRDs
        elif key == "items":
            out["items"] = _structural(value, defs, f"{where}[]", is_field=False)
        elif key == "properties":
            out["properties"] = {
                name: _structural(prop, defs, f"{where}.{name}") for name, prop in value.items()
            }
        elif key == "required":
            out["required"] = list(value)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = _structural(
                    value, defs, f"{where}{{}}", is_field=False
                )
            # `false` is what the API server does anyway (prune / strict field validation)
        else:
            raise CRDGenerationError(f"{where}: JSON schema key {key!r} has no CRD equivalent")
    if out.get("x-kubernetes-int-or-string"):
        # the one anyOf a structural schema allows; negative integers are no quantity
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out["x-kubernetes-validations"] = [QUANTITY_RULE.render()]
    if out.get("type") == "string" and "enum" in out and "maxLength" not in out:
        # CEL's cost estimate reads maxLength, not the enum: bound it by the longest value.
        out["maxLength"] = max(len(str(v)) for v in out["enum"])
    if uri_kind is not None:
        out["x-kubernetes-validations"] = [r.render() for r in field_rules(uri_kind)]
    untyped_ok = out.get("x-kubernetes-preserve-unknown-fields") or out.get(
        "x-kubernetes-int-or-string"
    )
    if "type" not in out and not untyped_ok:
        raise CRDGenerationError(f"{where} has no type — a structural schema needs one")
    return _ordered(out)


def _ordered(node: Schema) -> Schema:
    unknown = set(node) - set(_ORDER)
    if unknown:
        raise CRDGenerationError(f"keys without a place in the output order: {sorted(unknown)}")
    return {key: node[key] for key in _ORDER if key in node}


def _model_schema(model: type[BaseModel], where: str) -> Schema:
    raw = model.model_json_schema(by_alias=True, schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs, where)


def _node(schema: Schema, dotted: str) -> Schema:
    """The schema node at a dotted path of property names ("" is the node itself)."""
    node = schema
    for name in filter(None, dotted.split(".")):
        try:
            node = node["properties"][name]
        except KeyError:
            raise CRDGenerationError(f"no field {dotted!r} in the schema") from None
    return node


def _attach(schema: Schema, at: str, key: str, value: Any) -> None:
    node = _node(schema, at)
    if key == "x-kubernetes-validations":
        node.setdefault(key, []).append(value)
    else:
        node[key] = value
    reordered = _ordered(node)
    node.clear()
    node.update(reordered)


def spec_schema() -> Schema:
    """`spec`: the model's schema, structural (rules are attached by :func:`open_api_schema`)."""
    return _model_schema(TrainingRunSpec, "spec")


def status_schema() -> Schema:
    """`status`: every field the operator writes, typed (run_status.py); nothing else is kept."""
    return _model_schema(TrainingRunStatus, "status")


def open_api_schema() -> Schema:
    """The whole `openAPIV3Schema` of the served version."""
    root: Schema = {
        "description": (
            "A TrainingRun declares one LLM training run — data, tokenizer, model, method, "
            "hyper-parameters and compute — and kubetrain turns it into preprocessing, an optional "
            "sanity gate, (DeepSpeed) training, merge and evaluation."
        ),
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "Versioned schema of this object: kubetrain.dev/v1alpha1.",
                "type": "string",
            },
            "kind": {
                "description": "The REST resource this object represents: TrainingRun.",
                "type": "string",
            },
            "metadata": {
                "description": (
                    f"Standard object metadata; the name is a DNS-1035 label of at most "
                    f"{MAX_NAME_LENGTH} characters."
                ),
                "type": "object",
            },
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "required": ["spec"],
    }
    for at, list_type in LIST_TYPES.items():
        _attach(root, at, "x-kubernetes-list-type", list_type)
    for rule in cel_rules():
        _attach(root, rule.at, "x-kubernetes-validations", rule.render())
    return root


PRINTER_COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # `kubectl get tr -o wide`
    {"name": "Stage", "type": "string", "jsonPath": ".spec.method.stage", "priority": 1},
    {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1},
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "priority": 1,
    },
]


def build_crd() -> Schema:
    """The CustomResourceDefinition as a dict (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "kubetrain",
                "app.kubernetes.io/part-of": "kubetrain",
            },
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML, byte-for-byte what `crds/trainingruns.kubetrain.dev.yaml` holds."""
    body = yaml.safe_dump(
        build_crd(), sort_keys=False, allow_unicode=True, width=4096, default_flow_style=False
    )
    return HEADER + body
