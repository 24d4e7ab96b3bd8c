"""What the API server does with a TrainingRun, for tests: defaulting, validation and CEL rules.

Real: the OpenAPI validation is `openapi_schema_validator.OAS30Validator` on the generated CRD's
`openAPIV3Schema`; the CEL rules are parsed and evaluated by `cel-python` (celpy), a separate
implementation of the CEL spec, so a rule that does not say what we think fails here.

Emulated (no kube-apiserver can run here, see docs/testing.md), each a small port of the
apiextensions-apiserver behaviour it names:
- structural defaulting (`structuraldefaulting.Default`): a missing field with a `default` gets
  it, then nested defaults apply inside it; a `null` in a non-nullable field is pruned/defaulted;
- strict field validation (kubectl's default `--validate=strict`): unknown fields are refused —
  done by adding `additionalProperties: false` to a COPY of the schema, wherever the schema does
  not preserve unknown fields;
- `x-kubernetes-list-type: set`: duplicate items are refused (OAS30Validator does not know it);
- how values reach CEL (`SchemaDeclType`, `UnstructuredToVal`): only declared fields are visible,
  `number` fields are doubles even when written as integers, an untyped
  `x-kubernetes-preserve-unknown-fields` node cannot be read but takes part in equality (so
  `self == oldSelf` on `data` sees `data.train`), and of the root's metadata only name and
  generateName;
- rule scheduling: a rule runs where its node has a value; a transition rule (one that reads
  `oldSelf`) runs only on update, when the old object has a value there too.
"""

from __future__ import annotations

import copy
import functools
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import celpy
from celpy import celtypes
from openapi_schema_validator import OAS30Validator

from kubetrain_operator.crd import build_crd

Schema = dict[str, Any]


def crd() -> Schema:
    return build_crd()


@functools.cache
def _schema() -> Schema:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_schema() -> Schema:
    """A fresh copy of the CRD's `openAPIV3Schema` (callers may mutate it)."""
    return copy.deepcopy(_schema())


# ------------------------------------------------------------------------------------- defaulting


def apply_defaults(obj: Any, schema: Schema | None = None, *, in_place: bool = False) -> Any:
    """The object as the API server stores it: defaults applied, non-nullable nulls pruned.
    `in_place`: into `obj` itself (a copy the caller owns), sparing a copy per write."""
    if not in_place:
        obj = copy.deepcopy(obj)
    _default(obj, schema if schema is not None else _schema())
    return obj


def _default(value: Any, schema: Schema) -> None:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, prop in props.items():
            if key in value and value[key] is None and not prop.get("nullable"):
                del value[key]
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                _default(item, props[key])
            elif isinstance(extra, dict):
                _default(item, extra)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(item, schema["items"])


# ---------------------------------------------------------------------------------------- pruning


def prune(obj: Any, schema: Schema | None = None) -> tuple[Any, list[str]]:
    """The object with fields the schema does not declare removed, and their paths.

    As apiextensions-apiserver's `structuralpruning.Prune`: unknown fields go, except under
    `x-kubernetes-preserve-unknown-fields`; of the root's metadata, only the standard
    ObjectMeta fields are kept (the server owns those). With strict field validation the same
    paths are errors instead (`strict decoding error: unknown field`).
    """
    obj = pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))  # copy.deepcopy, 4x faster
    removed: list[str] = []
    root = schema if schema is not None else _schema()
    if isinstance(obj, dict):
        for key in list(obj):
            if key in ("apiVersion", "kind", "metadata"):
                continue
            prop = root.get("properties", {}).get(key)
            if prop is None and not root.get("x-kubernetes-preserve-unknown-fields"):
                removed.append(key)
                del obj[key]
            elif prop is not None:
                _prune(obj[key], prop, key, removed)
    return obj, removed


def _prune(value: Any, schema: Schema, path: str, removed: list[str]) -> None:
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        for key in list(value):
            if props is not None and key in props:
                _prune(value[key], props[key], join(path, key), removed)
            elif isinstance(extra, dict):
                _prune(value[key], extra, join(path, key), removed)
            elif not preserve and extra is not True:
                removed.append(join(path, key))
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune(item, schema["items"], f"{path}[{index}]", removed)


# ------------------------------------------------------------------------------- schema validation


def strict(schema: Schema) -> Schema:
    """A copy that refuses unknown fields, as strict field validation does on the API server."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: Schema) -> None:
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for name, child in node.get("properties", {}).items():
        if name != "metadata":  # server-set metadata fields are not declared in a CRD
            _close(child)
    if isinstance(node.get("items"), dict):
        _close(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        _close(node["additionalProperties"])


@dataclass(frozen=True)
class SchemaError:
    path: str
    message: str
    #: the validator's own error (keyword, value), for callers that word it as the API server does
    error: Any = field(default=None, compare=False, repr=False)


def schema_errors(
    obj: Any,
    *,
    unknown_fields: bool = True,
    schema: Schema | None = None,
    defaulted: bool = False,
) -> list[SchemaError]:
    """Problems the API server's OpenAPI validation reports (after defaulting, as it does).

    `schema` is another CRD's `openAPIV3Schema` (the cluster stand-in admits any CRD's objects);
    `defaulted`: `obj` has been through `apply_defaults` already.
    """
    base = schema if schema is not None else _schema()
    if not defaulted:
        obj = apply_defaults(obj, base)
    validator = _validator(base, unknown_fields)
    found = [
        SchemaError(dotted(error.absolute_path), error.message, error)
        for error in validator.iter_errors(obj)
    ]
    found += [
        SchemaError(path, "duplicate item in a set")
        for path in _set_duplicates(validator.schema, obj, "")
    ]
    return found


_VALIDATORS: dict[tuple[int, bool], tuple[Schema, OAS30Validator]] = {}


def _validator(schema: Schema, unknown_fields: bool) -> OAS30Validator:
    """One validator per schema object and strictness (a registered CRD's schema is fixed):
    building one, and the strict copy, per write was a tenth of the cluster stand-in's time
    under load. Callers must not mutate a schema once validated against."""
    key = (id(schema), unknown_fields)
    cached = _VALIDATORS.get(key)
    if cached is None or cached[0] is not schema:
        checked = strict(schema) if unknown_fields else schema
        cached = _VALIDATORS[key] = (schema, OAS30Validator(checked))
    return cached[1]


def _set_duplicates(schema: Schema, value: Any, path: str) -> Iterator[str]:
    if isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "set":
            seen: list[Any] = []
            for index, item in enumerate(value):
                if item in seen:
                    yield f"{path}[{index}]"
                seen.append(item)
        for index, item in enumerate(value):
            if "items" in schema:
                yield from _set_duplicates(schema["items"], item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key in value:
                yield from _set_duplicates(prop, value[key], join(path, key))


def dotted(parts: Any) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else join(path, str(part))
    return path


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -------------------------------------------------------------------------------------------- CEL

NOT_VISIBLE = object()


class Preserved:
    """Data under an untyped `x-kubernetes-preserve-unknown-fields` node, as CEL holds it.

    No rule can read it (the type checker has no declaration for it; test_crd checks that no rule
    tries), but it takes part in equality, as `unknownPreserved` in k8s.io/apiserver/pkg/cel/common/
    values.go does with a deep comparison: `self == oldSelf` on `data` sees a changed `data.train`.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preserved) and self.value == other.value

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(repr(self.value))


_ENV = celpy.Environment()


@functools.cache
def program(rule: str) -> Any:
    """Compile a rule once (celpy parses the full CEL grammar; a syntax error raises here)."""
    return _ENV.program(_ENV.compile(rule))


def to_cel(schema: Schema, value: Any, *, root: bool = False) -> Any:
    """A value as CEL sees it on the API server, typed by the schema, not by the YAML."""
    if schema.get("x-kubernetes-int-or-string"):
        return celpy.json_to_cel(value)
    kind = schema.get("type")
    if kind is None:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return Preserved(value)
        return NOT_VISIBLE
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "string":
        return celtypes.StringType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "array":
        items = [to_cel(schema["items"], item) for item in value]
        return celtypes.ListType(items)
    if "properties" not in schema and isinstance(schema.get("additionalProperties"), dict):
        extra = schema["additionalProperties"]
        return celtypes.MapType(
            {celtypes.StringType(k): to_cel(extra, v) for k, v in value.items()}
        )
    props = dict(schema.get("properties", {}))
    fields: dict[Any, Any] = {}
    if root:
        meta = value.get("metadata") or {}
        for key in ("apiVersion", "kind"):
            if key in value:
                fields[celtypes.StringType(key)] = celtypes.StringType(value[key])
        fields[celtypes.StringType("metadata")] = celtypes.MapType(
            {
                celtypes.StringType(k): celtypes.StringType(meta[k])
                for k in ("name", "generateName")
                if k in meta
            }
        )
        props = {k: v for k, v in props.items() if k not in ("apiVersion", "kind", "metadata")}
    for key, prop in props.items():
        if key in value:
            converted = to_cel(prop, value[key])
            if converted is not NOT_VISIBLE:
                fields[celtypes.StringType(key)] = converted
    return celtypes.MapType(fields)


@dataclass(frozen=True)
class RuleResult:
    """One rule that did not pass: where (the field path the API server would report), and why."""

    path: str
    rule: str
    message: str
    error: str | None = None  # the rule could not be evaluated (a bug in the rule, not the object)


_ABSENT = object()


@dataclass
class Evaluation:
    failures: list[RuleResult]
    evaluated: int  # rule evaluations made, so a test can show the rules really ran


def evaluate_rules(obj: Any, old: Any = None, schema: Schema | None = None) -> Evaluation:
    """Run every x-kubernetes-validations rule on `obj` (an update from `old` when given).

    Both objects are defaulted first, as the API server does before it validates.
    """
    schema = schema if schema is not None else _schema()
    result = Evaluation([], 0)
    previous = apply_defaults(old, schema) if old is not None else _ABSENT
    _walk(schema, apply_defaults(obj, schema), previous, "", result, root=True)
    return result


def rule_failures(obj: Any, old: Any = None) -> list[RuleResult]:
    return evaluate_rules(obj, old).failures


def _message(entry: Schema) -> str:
    """The rule's message; without one the API server says which rule failed."""
    return str(entry.get("message") or f"failed rule: {entry['rule']}")


def _walk(
    schema: Schema, value: Any, old: Any, path: str, out: Evaluation, *, root: bool = False
) -> None:
    for entry in schema.get("x-kubernetes-validations", []):
        rule = entry["rule"]
        transition = "oldSelf" in rule
        if transition and old is _ABSENT:
            continue
        where = path
        if "fieldPath" in entry:
            where = (path + entry["fieldPath"]) if path else entry["fieldPath"].lstrip(".")
        activation = {"self": to_cel(schema, value, root=root)}
        if transition:
            activation["oldSelf"] = to_cel(schema, old, root=root)
        out.evaluated += 1
        try:
            result = program(rule).evaluate(activation)
        except celpy.CELEvalError as error:
            out.failures.append(RuleResult(where, rule, _message(entry), error=str(error)))
            continue
        if not (isinstance(result, celtypes.BoolType) and bool(result)):
            error = None if isinstance(result, celtypes.BoolType) else f"not a bool: {result!r}"
            out.failures.append(RuleResult(where, rule, _message(entry), error=error))
    if isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key in value:
                before = old.get(key, _ABSENT) if isinstance(old, dict) else _ABSENT
                _walk(prop, value[key], before, join(path, key), out)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            # no list-map correlation of old items: no rule sits inside a list (test_crd checks)
            _walk(schema["items"], item, _ABSENT, f"{path}[{index}]", out)
