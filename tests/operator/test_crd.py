"""The generated TrainingRun CRD: fresh on disk, structural, documented, and its rules really work.

Real: the CRD comes from `kubetrain_operator.crd` (generated from the pydantic model); the committed
files are compared byte for byte; the CRD manifest is validated as an apiextensions.k8s.io/v1 object
by `kubernetes-validate` (bundled Kubernetes 1.29 and 1.37 schemas, strict); custom resources are
validated against its `openAPIV3Schema` by `openapi_schema_validator.OAS30Validator`; every CEL rule
is parsed and evaluated by `cel-python`, on the examples, on violating objects
(tests/operator/test_api.py) and on updates (transition rules with `oldSelf`). Statuses are
real too: `status.derive_status`'s, through tests/support/status_world.py.

Emulated, because no API server can run here (standin/crd_emulation.py says how): defaulting
before validation, strict field validation, list-type `set`, which fields CEL can see, when
transition rules run. The structural-schema rules are checked by `structural_problems` below, a
port of the checks the API server makes when a CRD is created; `test_structural_checker_can_fail`
proves each check fires.

Which fields CEL can read (`cel_exposure_problems`) follows the API server, which compiles every
rule when the CRD is created and refuses the whole CRD when one fails to compile
(k8s.io/apiextensions-apiserver `pkg/apiserver/schema/cel`, types from k8s.io/apiserver
`pkg/cel/common/schemas.go`, `SchemaDeclType`):
- a node with a `type` is declared (object, array, string, integer, number, boolean); an
  `x-kubernetes-int-or-string` node is declared (as a dynamic int-or-string);
- a node with `x-kubernetes-preserve-unknown-fields` and no `type` is NOT declared — a rule there,
  or a rule reading it, does not compile ("failed to retrieve type information");
- an object's property is declared only when its own schema is, so an undeclared node also hides
  everything below it; of the root's metadata only `name` and `generateName` are declared;
- list items are declared by `items`; a macro variable (`l.all(x, …)`) has the items' type.
References inside `has()` count like any other: `has(self.x.y)` does not compile either when `x`
is not declared. The cost bound (`cel_cost_problems`) follows the static estimate of cel-go's
`checker/cost.go` as the apiextensions validation applies it (a per-rule limit, and one for the
CRD, with each rule's cost multiplied by the largest number of times it can run: the `maxItems`
of every list above it); an unbounded string or list a rule touches makes the estimate explode,
so every one must have `maxLength` / `maxItems`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from pydantic import BaseModel

from kubetrain_operator import api, crd, rules
from operator_support import run_doc
from standin import crd_emulation as kube
from status_world import World, status_schema_errors, through_data

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = [
    ROOT / "crds" / "trainingruns.kubetrain.dev.yaml",
    ROOT / "charts" / "kubetrain" / "crds" / "trainingruns.kubetrain.dev.yaml",
]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EXPECTED_EXAMPLES = {
    "tinystories-cpu.yaml",
    "tinystories.yaml",
    "mistral-qlora.yaml",
    "llama-lora-merge.yaml",
    "tulu-sft.yaml",
    "tulu-dpo.yaml",
    "policy-mixture.yaml",
    "tulu-sft-hub.yaml",
    "mixture-cpu.yaml",
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------ the files on disk


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_is_fresh(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing — run `make crd`"
    assert path.read_text() == crd.crd_yaml(), (
        f"{path.relative_to(ROOT)} is stale: api.py or crd.py changed — run `make crd` and commit"
    )


def test_crd_yaml_is_deterministic_and_says_it_is_generated() -> None:
    text = crd.crd_yaml()
    assert text == crd.crd_yaml()
    assert text.startswith("# Generated from operator/kubetrain_operator/api.py")
    assert "make crd" in text.splitlines()[1]
    assert yaml.safe_load(text) == crd.build_crd()


def test_chart_declares_the_kubernetes_version_cel_needs() -> None:
    chart = load(ROOT / "charts" / "kubetrain" / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "kubetrain"
    assert chart["version"] == chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.29.0-0"
    assert chart["description"]


# ------------------------------------------------------------------------------------ the manifest


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_crd_is_a_valid_apiextensions_v1_object(version: str) -> None:
    kubernetes_validate.validate(crd.build_crd(), version, strict=True)


def test_crd_names_scope_and_subresources() -> None:
    doc = crd.build_crd()
    assert doc["metadata"]["name"] == "trainingruns.kubetrain.dev"
    spec = doc["spec"]
    assert spec["group"] == api.API_GROUP == "kubetrain.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "TrainingRun",
        "listKind": "TrainingRunList",
        "plural": "trainingruns",
        "singular": "trainingrun",
        "shortNames": ["tr"],
        "categories": ["kubetrain"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns_read_fields_the_schema_declares() -> None:
    [version] = crd.build_crd()["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    default_view = [c["name"] for c in columns if not c.get("priority")]
    assert default_view == ["Phase", "Step", "Loss", "ETA", "Ready", "Age"]
    by_name = {c["name"]: c for c in columns}
    assert by_name["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert by_name["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }
    schema = version["schema"]["openAPIV3Schema"]
    for column in columns:
        if column["jsonPath"].startswith(".metadata."):
            continue
        path = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"]).lstrip(".")
        node = schema
        for part in path.split("."):
            name = part.removesuffix("[]")
            node = node["properties"][name]
            if part.endswith("[]"):
                node = node["items"]
        assert node["type"] == column["type"], column


# -------------------------------------------------------------------------- structural schema rules

OAS_KEYS = {
    "description",
    "type",
    "format",
    "enum",
    "default",
    "nullable",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
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
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-validations",
    "anyOf",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
RULE_KEYS = {"rule", "message", "messageExpression", "fieldPath", "reason", "optionalOldSelf"}


def structural_problems(schema: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a CRD's openAPIV3Schema, plus our own documentation rule.

    A port of the structural-schema checks (every node typed, no $ref/definitions, no junctors
    carrying types, no additionalProperties beside properties, metadata restricted) and of where
    CEL rules may sit (only on nodes `SchemaDeclType` exposes, never inside lists here).
    """
    problems: list[str] = []
    _check(schema, "", problems, is_field=False, in_list=False, root=True)
    return problems


def _check(
    node: Any, path: str, out: list[str], *, is_field: bool, in_list: bool, root: bool = False
) -> None:
    where = path or "(root)"
    if not isinstance(node, dict):
        out.append(f"{where}: a schema must be an object")
        return
    for key in sorted(set(node) - OAS_KEYS):
        out.append(f"{where}: {key!r} is not allowed in a structural schema")
    int_or_string = [{"type": "integer"}, {"type": "string"}]
    if node.get("anyOf") == int_or_string and node.get("x-kubernetes-int-or-string"):
        pass  # the one junctor with types a structural schema allows
    elif "anyOf" in node:
        out.append(f"{where}: anyOf (this generator must not need value junctors)")
    for junctor in ("oneOf", "allOf", "not"):
        if junctor in node:
            out.append(f"{where}: {junctor} (this generator must not need value junctors)")
    untyped_ok = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    kind = node.get("type")
    if kind is None and not untyped_ok:
        out.append(f"{where}: no type")
    if kind is not None and kind not in TYPES:
        out.append(f"{where}: type {kind!r}")
    if (is_field or kind in ("object", "array")) and not str(node.get("description", "")).strip():
        out.append(f"{where}: no description")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{where}: additionalProperties alongside properties")
    if isinstance(node.get("additionalProperties"), bool):
        out.append(f"{where}: additionalProperties must be a schema, not a boolean")
    if kind == "array" and "items" not in node:
        out.append(f"{where}: an array without items")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            out.append(f"{where}: {key} must be a boolean in OpenAPI 3.0")
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        out.append(f"{where}: x-kubernetes-preserve-unknown-fields may only be true")
    if "default" in node:
        bare = {k: v for k, v in node.items() if k not in ("default", "x-kubernetes-validations")}
        errors = [e.message for e in OAS30Validator(kube.strict(bare)).iter_errors(node["default"])]
        if errors:
            out.append(f"{where}: default does not validate: {errors}")
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            if key not in item.get("required", []) and "default" not in item["properties"][key]:
                out.append(f"{where}: list-map key {key} must be required or defaulted")
    if node.get("x-kubernetes-validations"):
        if not _declared(node):
            out.append(f"{where}: rules on an untyped node are refused (CEL cannot see it)")
        transition = any("oldSelf" in r.get("rule", "") for r in node["x-kubernetes-validations"])
        if in_list and transition:
            out.append(f"{where}: a transition rule inside a list needs list-map correlation")
        for rule in node["x-kubernetes-validations"]:
            out.extend(f"{where}: {p}" for p in _rule_problems(node, rule, root=root))
    if root:
        meta = node.get("properties", {}).get("metadata", {})
        if set(meta.get("properties", {})) - {"name", "generateName"}:
            out.append("metadata: only name and generateName may be restricted")
    for name, child in node.get("properties", {}).items():
        if root and name == "metadata":
            continue
        _check(child, f"{path}.{name}" if path else name, out, is_field=True, in_list=in_list)
    if isinstance(node.get("items"), dict):
        _check(node["items"], f"{where}[]", out, is_field=False, in_list=True)
    if isinstance(node.get("additionalProperties"), dict):
        _check(node["additionalProperties"], f"{where}{{}}", out, is_field=False, in_list=in_list)


REFERENCE = re.compile(r"\b([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*\b(?!\s*\())+)")
MACRO = re.compile(
    r"\b((?:self|oldSelf)(?:\.[A-Za-z_]\w*)*)\.(?:all|exists|exists_one|map|filter)\(\s*(\w+)\s*,"
)
HAS = re.compile(r"has\(\s*self((?:\.[A-Za-z_]\w*)+)\s*\)")
CEL_WORDS = {"true", "false", "null", "in", "int", "string", "double", "bool", "size", "type"}


def _rule_problems(node: dict[str, Any], rule: dict[str, Any], *, root: bool) -> Iterator[str]:
    """A rule must compile, name the fix, and guard every field that can be absent."""
    text = rule.get("rule", "")
    for key in sorted(set(rule) - RULE_KEYS):
        yield f"rule {text!r}: unknown key {key!r}"
    message = rule.get("message", "")
    if not message or "\n" in message or "—" not in message:
        yield f"rule {text!r}: the message must be one line that names the fix after '—'"
    try:
        kube.program(text)
    except Exception as error:  # celpy raises its own parse errors
        yield f"rule {text!r} does not compile: {error}"
    if (
        "fieldPath" in rule
        and _resolve(node, rule["fieldPath"].lstrip(".").split("."), root) is None
    ):
        yield f"rule {text!r}: fieldPath {rule['fieldPath']} is not a declared field"
    guarded = {m.group(1) for m in HAS.finditer(text)}
    for match in REFERENCE.finditer(_strings_removed(text)):
        if match.group(1) != "self":
            continue
        parts = match.group(2).lstrip(".").split(".")
        for depth in range(1, len(parts) + 1):
            parent = _resolve(node, parts[: depth - 1], root)
            if parent is None:
                break  # cel_exposure_problems reports it
            name = parts[depth - 1]
            prefix = "." + ".".join(parts[:depth])
            always_there = name in parent.get("required", []) or "default" in parent.get(
                "properties", {}
            ).get(name, {})
            if root and parts[:depth] in (["metadata"], ["metadata", "name"]):
                always_there = True  # the API server always sets metadata.name before validation
            if not always_there and prefix not in guarded and not _inside_has(text, prefix):
                yield f"rule {text!r}: self{prefix} may be absent — guard it with has()"


def _inside_has(text: str, prefix: str) -> bool:
    """`has(self.a.b)` also guards `self.a` (has() of a child implies the parent is there)."""
    return any(g.startswith(prefix + ".") for g in (m.group(1) for m in HAS.finditer(text)))


def _strings_removed(text: str) -> str:
    """The rule with its string literals blanked (a regex may look like a field reference)."""
    return re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)


def _resolve(node: dict[str, Any], parts: list[str], root: bool) -> dict[str, Any] | None:
    """The declared node at a path of property names, or None where CEL cannot see it."""
    for index, name in enumerate(parts):
        if root and index == 0 and name == "metadata":
            node = {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 253},
                    "generateName": {"type": "string", "maxLength": 253},
                },
            }
            continue
        child = node.get("properties", {}).get(name)
        if child is None or not _declared(child):
            return None
        node = child
    return node


def _declared(node: dict[str, Any]) -> bool:
    """SchemaDeclType: typed nodes and int-or-string; not untyped preserve-unknown-fields."""
    return node.get("type") is not None or bool(node.get("x-kubernetes-int-or-string"))


def _rules_with_scope(
    node: dict[str, Any], path: str = "", lists: tuple[int | None, ...] = (), root: bool = True
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], tuple[int | None, ...], bool]]:
    """(path, node, rule, maxItems of the lists above, at root) for every rule of the schema."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path or "(root)", node, rule, lists, root
    for name, child in node.get("properties", {}).items():
        if not (root and name == "metadata"):
            yield from _rules_with_scope(child, f"{path}.{name}" if path else name, lists, False)
    if isinstance(node.get("items"), dict):
        yield from _rules_with_scope(
            node["items"], f"{path}[]", (*lists, node.get("maxItems")), False
        )
    if isinstance(node.get("additionalProperties"), dict):
        yield from _rules_with_scope(
            node["additionalProperties"], f"{path}{{}}", (*lists, node.get("maxProperties")), False
        )


def _referenced(node: dict[str, Any], text: str, root: bool) -> Iterator[tuple[str, dict | None]]:
    """(reference, declared node or None) for every field path the rule reads, macro variables
    resolved to their list's items, `has()` arguments included."""
    scopes: dict[str, tuple[dict[str, Any] | None, str]] = {"self": (node, "self")}
    if "oldSelf" in text:
        scopes["oldSelf"] = (node, "oldSelf")
    bare = _strings_removed(text)
    for match in MACRO.finditer(bare):
        base, var = match.group(1), match.group(2)
        head, *rest = base.split(".")
        lst = (
            _resolve(scopes[head][0] or {}, rest, root and head != "x") if head in scopes else None
        )
        item = lst.get("items") if lst is not None and lst.get("type") == "array" else None
        scopes[var] = (item if isinstance(item, dict) and _declared(item) else None, var)
    for match in REFERENCE.finditer(bare):
        head, tail = match.group(1), match.group(2)
        if head not in scopes:
            continue
        scope = scopes[head][0]
        target = (
            None
            if scope is None
            else _resolve(scope, tail.lstrip(".").split("."), root and head in ("self", "oldSelf"))
        )
        yield head + tail, target
    for head in scopes:
        if re.search(rf"\b{head}\b(?!\s*\.)", bare) and scopes[head][0] is not None:
            yield head, scopes[head][0]


def cel_exposure_problems(schema: dict[str, Any]) -> list[str]:
    """Rules the API server would refuse to compile: on an undeclared node, or reading one."""
    problems = []
    for path, node, rule, _, root in _rules_with_scope(schema):
        text = rule.get("rule", "")
        if not _declared(node):
            problems.append(f"{path}: rule {text!r} sits on a node CEL cannot see (no type)")
        for reference, target in _referenced(node, text, root):
            if target is None:
                problems.append(f"{path}: rule {text!r} reads {reference}, which CEL cannot see")
    return problems


#: cel-go checker/cost.go: strings cost 0.1 per byte to traverse, a regex 0.25 per byte of
#: pattern; apiextensions' limits: per rule, and the whole CRD.
STRING_TRAVERSAL_FACTOR, REGEX_FACTOR = 0.1, 0.25
PER_RULE_LIMIT, PER_CRD_LIMIT = 10_000_000, 100_000_000


def _cost(node: dict[str, Any] | None) -> float:
    """What reading a node can cost at most: its size bound (unbounded: infinite)."""
    if node is None:
        return 1
    if node.get("type") == "string" or node.get("x-kubernetes-int-or-string"):
        return math.ceil(node.get("maxLength", 3 * 2**20) * STRING_TRAVERSAL_FACTOR)
    if node.get("type") == "array":
        return node.get("maxItems", math.inf) * _cost(node.get("items"))
    if node.get("type") == "object" and "additionalProperties" in node:
        return node.get("maxProperties", math.inf) * _cost(node["additionalProperties"])
    return 1


def cel_cost_problems(schema: dict[str, Any]) -> list[str]:
    """Every string and list a rule touches is bounded, and the estimate stays under the limits."""
    problems, total = [], 0.0
    for path, node, rule, lists, root in _rules_with_scope(schema):
        text = rule.get("rule", "")
        runs = 1.0
        for bound in lists:
            if bound is None:
                problems.append(f"{path}: rule {text!r} sits in a list without maxItems")
                bound = math.inf
            runs *= bound
        cost = 1.0
        for reference, target in _referenced(node, text, root):
            if target is not None and target.get("type") in ("string", "array"):
                bound_key = "maxLength" if target["type"] == "string" else "maxItems"
                if bound_key not in target:
                    problems.append(f"{path}: rule {text!r} reads {reference} without {bound_key}")
            cost += _cost(target)
        for pattern in re.findall(r"\.matches\(\s*'((?:[^'\\]|\\.)*)'", text):
            cost += _cost(node) * math.ceil(len(pattern) * REGEX_FACTOR)
        if runs * cost > PER_RULE_LIMIT:
            problems.append(f"{path}: rule {text!r} costs ~{runs * cost:.0f} (> {PER_RULE_LIMIT})")
        total += runs * cost
    if total > PER_CRD_LIMIT:
        problems.append(f"all rules together cost ~{total:.0f} (> {PER_CRD_LIMIT})")
    return problems


def test_committed_crd_rules_read_only_what_cel_can_see() -> None:
    committed = yaml.safe_load(CRD_FILES[0].read_text())
    schema = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert sum(1 for _ in _rules_with_scope(schema)) >= len(crd.cel_rules())
    assert cel_exposure_problems(schema) == []


def test_committed_crd_rules_are_bounded_for_the_cost_estimate() -> None:
    committed = yaml.safe_load(CRD_FILES[0].read_text())
    schema = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert cel_cost_problems(schema) == []


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for name in dotted.split("."):
        node = node["properties"][name]
    return node


def test_exposure_check_fails_on_what_the_api_server_refuses() -> None:
    """The old CRD's mistake: a rule naming an untyped preserve-unknown-fields node in has()."""
    schema = kube.openapi_schema()
    data = _at(schema, "spec.data")
    data["properties"]["validation"] = {
        "description": "untyped",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    assert any("self.validation" in p for p in cel_exposure_problems(schema))
    schema = kube.openapi_schema()
    _at(schema, "spec.sanity")["properties"]["rungs"]["items"] = {
        "description": "untyped",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    assert any("r.gpus" in p for p in cel_exposure_problems(schema))
    schema = kube.openapi_schema()
    _at(schema, "spec")["x-kubernetes-validations"].append(
        {"rule": "has(self.nothing.here)", "message": "x — y"}
    )
    assert any("self.nothing" in p for p in cel_exposure_problems(schema))


def test_cost_check_fails_on_unbounded_strings_and_lists() -> None:
    schema = kube.openapi_schema()
    del _at(schema, "spec.data.train")["maxItems"]
    assert any("without maxItems" in p for p in cel_cost_problems(schema))
    schema = kube.openapi_schema()
    del _at(schema, "spec.training.optimizer")["maxLength"]
    assert any("training.optimizer without maxLength" in p for p in cel_cost_problems(schema))
    schema = kube.openapi_schema()
    _at(schema, "spec.data.train")["maxItems"] = 10**9
    assert any("costs" in p for p in cel_cost_problems(schema))


def test_schema_is_structural_and_documented() -> None:
    assert structural_problems(kube.openapi_schema()) == []


def _mutations() -> Iterator[tuple[str, Any]]:
    def at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
        node = schema
        for name in dotted.split("."):
            node = node["properties"][name]
        return node

    def ref(s: dict[str, Any]) -> None:
        at(s, "spec.model")["properties"]["architecture"] = {"$ref": "#/definitions/Architecture"}

    def no_type(s: dict[str, Any]) -> None:
        del at(s, "spec.data.blockSize")["type"]

    def additional(s: dict[str, Any]) -> None:
        at(s, "spec.training")["additionalProperties"] = False

    def no_description(s: dict[str, Any]) -> None:
        del at(s, "spec.training.seed")["description"]

    def any_of(s: dict[str, Any]) -> None:
        at(s, "spec.image")["anyOf"] = [{"type": "string"}, {"type": "null"}]

    def bad_default(s: dict[str, Any]) -> None:
        at(s, "spec.training.seed")["default"] = "forty-two"

    def json_schema_exclusive(s: dict[str, Any]) -> None:
        at(s, "spec.training.learningRate")["exclusiveMinimum"] = 0

    def rule_on_untyped(s: dict[str, Any]) -> None:
        at(s, "spec.data")["properties"]["train"] = {
            "description": "untyped",
            "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-validations": [{"rule": "type(self) == string", "message": "x — y"}],
        }

    def unguarded(s: dict[str, Any]) -> None:
        at(s, "spec")["x-kubernetes-validations"].append(
            {"rule": "self.sanity.steps > 1", "message": "x — y"}
        )

    def undeclared(s: dict[str, Any]) -> None:
        at(s, "spec")["x-kubernetes-validations"].append(
            {"rule": "self.data.nope == 1", "message": "x — y"}
        )

    def syntax(s: dict[str, Any]) -> None:
        at(s, "spec")["x-kubernetes-validations"].append({"rule": "self.(", "message": "x — y"})

    def bad_field_path(s: dict[str, Any]) -> None:
        at(s, "spec")["x-kubernetes-validations"][0]["fieldPath"] = ".nowhere"

    def title(s: dict[str, Any]) -> None:
        at(s, "spec.model")["title"] = "ModelSpec"

    yield from [
        ("ref", ref),
        ("no-type", no_type),
        ("additional-properties", additional),
        ("no-description", no_description),
        ("any-of", any_of),
        ("bad-default", bad_default),
        ("numeric-exclusive-minimum", json_schema_exclusive),
        ("rule-on-untyped-node", rule_on_untyped),
        ("unguarded-optional-field", unguarded),
        ("undeclared-field", undeclared),
        ("rule-syntax", syntax),
        ("bad-field-path", bad_field_path),
        ("title", title),
    ]


@pytest.mark.parametrize(("name", "mutate"), list(_mutations()), ids=[m[0] for m in _mutations()])
def test_structural_checker_can_fail(name: str, mutate: Any) -> None:
    schema = kube.openapi_schema()
    mutate(schema)
    assert structural_problems(schema), f"{name}: the checker let a broken schema through"


def test_generation_fails_loudly_without_a_description() -> None:
    class Undocumented(BaseModel):
        """Has a docstring, but its field has none."""

        steps: int = 1

    with pytest.raises(crd.CRDGenerationError, match="steps has no description"):
        crd._model_schema(Undocumented, "spec")


def test_optional_becomes_plain_type_and_exclusive_bounds_are_openapi_3_0() -> None:
    schema = kube.openapi_schema()["properties"]["spec"]["properties"]
    epochs = schema["training"]["properties"]["epochs"]
    assert (epochs["type"], epochs["minimum"], epochs["exclusiveMinimum"]) == ("number", 0, True)
    assert "nullable" not in epochs and "default" not in epochs
    assert schema["model"]["properties"]["architecture"]["properties"]["family"]["enum"] == [
        "llama"
    ]
    selector = schema["resources"]["properties"]["nodeSelector"]
    assert selector["type"] == "object" and selector["additionalProperties"]["type"] == "string"
    # sections default to {} so the API server fills in their fields, as the model does
    assert (
        schema["training"]["default"] == {}
        and schema["method"]["properties"]["adapter"]["default"] == {}
    )
    tokens = schema["tokenizer"]["properties"]["train"]["properties"]["specialTokens"]
    assert tokens["default"] == ["<|endoftext|>"] and tokens["x-kubernetes-list-type"] == "set"


def test_data_files_are_typed_lists_both_sides_agree_on() -> None:
    """data.train / data.validation are typed lists of URIs: CEL sees them, and the model accepts
    exactly what the CRD accepts (a bare string is refused by both)."""
    data = kube.openapi_schema()["properties"]["spec"]["properties"]["data"]["properties"]
    for name in ("train", "validation"):
        assert data[name]["type"] == "array" and data[name]["items"]["type"] == "string"
        assert data[name]["x-kubernetes-list-type"] == "set"
        assert data[name]["items"]["x-kubernetes-validations"]
    base = load(ROOT / "examples" / "mistral-qlora.yaml")
    for value, accepted in [
        (["s3://b/one.jsonl", "s3://b/two.jsonl"], True),
        (["s3://b/dir/"], True),  # a prefix
        (["s3://b/dir/*.jsonl", "data/*.txt"], True),  # globs
        ("s3://b/one.jsonl", False),
        ({"uri": "s3://b/x"}, False),
        (["s3://b/a", "s3://b/a"], False),
        ([], False),
    ]:
        doc = copy.deepcopy(base)
        doc["spec"]["data"]["train"] = value
        crd_accepts = kube.schema_errors(doc) == [] and kube.rule_failures(doc) == []
        try:
            api.parse_run(doc)
            model_accepts = True
        except api.InvalidRun:
            model_accepts = False
        assert (crd_accepts, model_accepts) == (accepted, accepted), value


# ------------------------------------------------------------------------------ status subresource

STATUS = {
    "observedGeneration": 3,
    "conditions": [
        {"type": "Ready", "status": "False", "reason": "Training", "message": "step 1200/30969"},
        {"type": "Reconciling", "status": "True", "reason": "Training", "message": ""},
        {"type": "Stalled", "status": "False", "reason": "Progressing", "message": ""},
        {"type": "DataReady", "status": "True", "reason": "CacheHit", "message": ""},
        {
            "type": "SanityPassed",
            "status": "True",
            "reason": "LossDropped",
            "message": "loss 2.45 → 2.12 in 100 steps",
            "lastTransitionTime": "2026-11-22T00:00:00Z",
            "observedGeneration": 3,
        },
        {"type": "Succeeded", "status": "Unknown", "reason": "Training", "message": ""},
    ],
    "phase": "Training",
    "dataset": {
        "cacheKey": "9f3c",
        "trainTokens": 21140992,
        "validationTokens": 5283840,
        "rejectedRows": {"emptyText": 12},
    },
    "progress": {
        "step": 1200,
        "totalSteps": 30969,
        "loss": 1.87,
        "tokensPerSecond": 2140,
        "eta": "14h02m",
        "lastStepTime": "2026-11-22T00:00:00Z",
    },
    "attempts": 2,
    "checkpoint": {"step": 1000, "uri": "s3://b/checkpoints/step-00001000"},
    "outputs": {"model": "s3://b/merged", "adapter": "s3://b/final"},
}


def _status() -> dict[str, Any]:
    status = copy.deepcopy(STATUS)
    for condition in status["conditions"]:
        condition.setdefault("lastTransitionTime", "2026-11-22T00:00:00Z")
    return status


def test_a_status_validates_and_undeclared_or_mistyped_fields_do_not() -> None:
    doc = load(ROOT / "examples" / "mistral-qlora.yaml") | {"status": _status()}
    assert kube.schema_errors(doc) == []
    doc["status"]["futureField"] = {"kept": True}
    doc["status"]["progress"]["gradNorm"] = 0.5
    # strict field validation refuses them; otherwise the API server prunes them
    assert {(e.path, e.message) for e in kube.schema_errors(doc)} == {
        ("status", "Additional properties are not allowed ('futureField' was unexpected)"),
        ("status.progress", "Additional properties are not allowed ('gradNorm' was unexpected)"),
    }
    assert sorted(kube.prune(doc)[1]) == ["status.futureField", "status.progress.gradNorm"]
    del doc["status"]["futureField"], doc["status"]["progress"]["gradNorm"]
    doc["status"]["conditions"][0]["status"] = "Maybe"
    doc["status"]["progress"]["step"] = "twelve"
    assert {e.path for e in kube.schema_errors(doc)} == {
        "status.conditions[0].status",
        "status.progress.step",
    }


T0_TEXT = "2026-11-22T00:00:00Z"


def test_the_status_check_of_the_status_tests_can_fail() -> None:
    """status_world validates every status the status tests derive (World.step); the same check
    refuses a field the CRD does not declare and a field of the wrong type."""
    world = World(run_doc())
    through_data(world)
    status = world.status
    assert status_schema_errors(status) == []
    assert status_schema_errors(status | {"completedStage": ["preprocess"]}) == [
        "Additional properties are not allowed ('completedStage' was unexpected)"
    ]
    mistyped = copy.deepcopy(status)
    mistyped["dataset"]["trainTokens"] = "21M"
    mistyped["attemptHistory"] = [{"attempt": 1, "reason": "retry", "startTime": T0_TEXT}]
    assert status_schema_errors(mistyped) == [
        "status.dataset.trainTokens: '21M' is not of type 'integer'",
        "status.attemptHistory[0].reason: 'retry' is not one of ['initial', 'failure', 'stall']",
    ]


def _status_nodes(node: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield where, node
    for name, prop in node.get("properties", {}).items():
        yield from _status_nodes(prop, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _status_nodes(node[key], f"{where}[]" if key == "items" else f"{where}{{}}")


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_status_field_is_declared_and_documented(path: Path) -> None:
    """`kubectl explain trainingrun.status.<field>` prints each property's description, and the
    API server keeps no status field the CRD does not declare (nothing in it is free-form)."""
    schema = load(path)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]
    nodes = dict(_status_nodes(status, "status"))
    properties = [w for w in nodes if not w.endswith(("[]", "{}"))]
    assert [w for w in properties if not nodes[w].get("description")] == []
    assert [w for w, n in nodes.items() if n.get("x-kubernetes-preserve-unknown-fields")] == []
    assert [w for w, n in nodes.items() if "type" not in n] == []
    issue_fields = {"completedStages", "attemptHistory", "sanity", "upstream", "evaluation"}
    assert issue_fields <= set(status["properties"])


def test_conditions_are_a_list_map_by_type_shaped_like_metav1_condition() -> None:
    conditions = kube.openapi_schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    required = {"type", "status", "reason", "message", "lastTransitionTime"}
    assert set(conditions["items"]["required"]) == required
    for missing in sorted(required):
        doc = load(ROOT / "examples" / "mistral-qlora.yaml") | {"status": _status()}
        del doc["status"]["conditions"][0][missing]
        assert [e.path for e in kube.schema_errors(doc)] == ["status.conditions[0]"], missing


# -------------------------------------------------------------------------------------- examples


def test_the_issue_s_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= EXPECTED_EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_model_schema_and_every_rule(path: Path) -> None:
    doc = load(path)
    api.parse_run(doc)
    assert kube.schema_errors(doc) == []
    evaluation = kube.evaluate_rules(doc)
    assert evaluation.failures == []
    assert evaluation.evaluated >= len(rules.RULES) // 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_api_server_defaults_change_nothing_the_model_would_not(path: Path) -> None:
    """The CRD's defaults are the model's: the stored (defaulted) object parses to the same run."""
    doc = load(path)
    stored = kube.apply_defaults(doc)
    assert stored != doc  # defaults really were applied
    assert api.parse_run(stored) == api.parse_run(doc)


def test_defaults_of_every_optional_section_match_the_model() -> None:
    doc = load(ROOT / "examples" / "tinystories-cpu.yaml")
    doc["spec"]["tokenizer"]["train"] = {"vocabSize": 1024}
    doc["spec"]["sanity"] = {}
    doc["spec"]["storage"] = {}
    doc["spec"]["resources"] = {"gpusPerNode": 0, "tolerations": [{"key": "gpu"}]}
    doc["spec"]["data"] = {"format": "text", "train": ["x.txt"], "blockSize": 128}
    doc["spec"]["model"]["architecture"] = {
        "hiddenSize": 64,
        "layers": 1,
        "heads": 4,
        "contextLength": 128,
    }
    stored = kube.apply_defaults(doc)
    assert stored["spec"]["tokenizer"]["train"]["specialTokens"] == ["<|endoftext|>"]
    assert stored["spec"]["storage"]["s3"]["accessKeyIdKey"] == "AWS_ACCESS_KEY_ID"
    assert stored["spec"]["resources"]["tolerations"][0]["operator"] == "Equal"
    assert api.parse_run(stored) == api.parse_run(doc)
    assert kube.schema_errors(doc) == [] and kube.rule_failures(doc) == []


# ------------------------------------------------------------------------------ transition rules


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    *parents, last = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return doc


IMMUTABLE_CHANGES = [
    ("spec.model.uri", "s3://models/other"),
    ("spec.tokenizer.uri", "s3://tokenizers/other"),
    ("spec.data.blockSize", 1024),
    ("spec.data.train", ["s3://datasets/policy/other.jsonl"]),
    ("spec.method.adapter.r", 8),
    ("spec.training.learningRate", 1.0e-4),
    ("spec.distributed.zeroStage", 2),
]
MUTABLE_CHANGES = [
    ("spec.suspend", True),
    ("spec.maxRestarts", 7),
    ("spec.stallTimeout", "1h"),
    ("spec.resources.memory", "96Gi"),
    ("spec.resources.gpusPerNode", 2),
    ("spec.queueName", "other-queue"),
    ("spec.sanity.steps", 10),
    ("metadata.labels", {"team": "nlp"}),
    ("spec.training.optimizer", "paged_adamw_8bit"),  # the value it already has: no change
]


@pytest.mark.parametrize(
    ("field", "value"), IMMUTABLE_CHANGES, ids=[c[0] for c in IMMUTABLE_CHANGES]
)
def test_changing_an_immutable_section_is_refused(field: str, value: Any) -> None:
    old = load(ROOT / "examples" / "mistral-qlora.yaml")
    new = _set(old, field, value)
    api.parse_run(new)  # a valid spec on its own: only the change is wrong
    assert kube.rule_failures(new) == []
    section = ".".join(field.split(".")[:2])
    failures = kube.rule_failures(new, old)
    assert [(f.path, f.rule, f.error) for f in failures] == [(section, "self == oldSelf", None)]
    assert "immutable" in failures[0].message and "—" in failures[0].message


@pytest.mark.parametrize(("field", "value"), MUTABLE_CHANGES, ids=[c[0] for c in MUTABLE_CHANGES])
def test_changing_a_mutable_field_is_allowed(field: str, value: Any) -> None:
    old = load(ROOT / "examples" / "mistral-qlora.yaml")
    new = _set(old, field, value)
    evaluation = kube.evaluate_rules(new, old)
    assert evaluation.failures == []
    assert evaluation.evaluated == kube.evaluate_rules(new).evaluated + len(
        rules.IMMUTABLE_SECTIONS
    )


def test_writing_out_a_default_is_not_a_change() -> None:
    """`training.optimizer` left to its default, then written out: the stored objects agree."""
    old = load(ROOT / "examples" / "tulu-sft.yaml")
    del old["spec"]["training"]["optimizer"]
    new = _set(old, "spec.training.optimizer", "adamw_torch")
    assert kube.rule_failures(new, old) == []
    assert [
        f.path for f in kube.rule_failures(_set(new, "spec.training.optimizer", "sgd"), old)
    ] == ["spec.training"]


def test_every_valid_spec_of_the_test_tables_passes_model_and_crd() -> None:
    """The variants the plan/render/contract tests use are valid custom resources too."""
    from runspecs import all_documents, local_documents

    documents = {**all_documents(), **local_documents()}
    assert len(documents) >= 15
    for doc_id, doc in documents.items():
        api.parse_run(doc)
        assert kube.schema_errors(doc) == [], doc_id
        evaluation = kube.evaluate_rules(doc)
        assert evaluation.failures == [], doc_id
