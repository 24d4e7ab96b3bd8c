"""The TrainingRun CustomResourceDefinition, generated from the API model — one source of truth.

`crds/trainingruns.kubetrain.dev.yaml` (and the chart's copy) is the output of :func:`crd_yaml`;
a test fails when the committed file is stale (`make crd` rewrites it). The spec schema is
`TrainingRunSpec.model_json_schema(by_alias=True)` turned into a Kubernetes *structural* schema:

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
- `data.train` / `data.validation` are "one URI or a list" (`x-kubetrain-one-or-many` in the
  model's schema). A structural schema cannot say "a string or a list of strings" (`type` may not
  appear inside `anyOf`), and neither can CEL: the API server does not expose an untyped
  `x-kubernetes-preserve-unknown-fields` node to CEL at all (`SchemaDeclType` in
  k8s.io/apiserver/pkg/cel/common/schemas.go returns nil for it, and a CRD with a rule there is
  refused: "failed to retrieve type information for x-kubernetes-validations"). So these two
  fields are untyped here; the operator checks their shape (`api.parse_run` → `InvalidSpec`).
  They are still immutable: `self == oldSelf` on `data` compares unreadable fields too.

The semantic rules of `api.py` that are cheap to state in CEL are mirrored as
`x-kubernetes-validations` (:data:`RULES`, :data:`ROOT_RULES`), so `kubectl apply` refuses the
common mistakes before the operator sees them; the operator still re-validates everything. Rules
rely on the API server's defaulting, which always runs before validation: a field with a default
is never absent when a rule reads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from kubetrain_operator.api import (
    API_GROUP,
    API_VERSION,
    DNS1035,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    URI_PATTERN,
    URI_SCHEMES,
    TrainingRunSpec,
)

Schema = dict[str, Any]

SINGULAR = "trainingrun"
SHORT_NAMES = ["tr"]
#: `kubectl get kubetrain` lists runs. Not in `all`: by convention that category holds the core
#: workload kinds, and a run's Jobs and PyTorchJobs already show there.
CATEGORIES = ["kubetrain"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

HEADER = (
    "# Generated from operator/kubetrain_operator/api.py by `kubetrain crd`: do not edit.\n"
    "# Change the model (or crd.py) and run `make crd`; tests/test_crd.py fails when stale.\n"
)

#: Sections that are immutable once a run exists (api.md): changing them would silently change
#: what a half-finished run means. Mutable: suspend, maxRestarts, stallTimeout, sanity, resources,
#: queueName (and labels and annotations).
IMMUTABLE_SECTIONS = ("model", "tokenizer", "data", "method", "training", "distributed")


class CRDGenerationError(RuntimeError):
    """The model cannot be expressed as a structural schema (or lacks a description)."""


# ------------------------------------------------------------------------------------------- status


class _Status(BaseModel):
    """camelCase like the spec; descriptions from docstrings, as in api.py."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True
    )


class Condition(_Status):
    """A kstatus condition (metav1.Condition shape); one per type."""

    type: str = Field(
        max_length=316, pattern=r"^([a-z0-9.\-]+/)?[A-Za-z]([A-Za-z0-9_.\-]*[A-Za-z0-9])?$"
    )
    """Ready, Reconciling, Stalled, DataReady, SanityPassed, Succeeded, Failed, Suspended."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown (Unknown on the operator's first visit)."""
    reason: str | None = Field(default=None, max_length=1024)
    """CamelCase reason, e.g. Training, CacheHit, InvalidSpec."""
    message: str | None = Field(default=None, max_length=32768)
    """Human-readable details."""
    last_transition_time: datetime | None = None
    """When status last changed (not when the condition was last written)."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this condition was computed from."""


class Progress(_Status):
    """Training progress, read from the trainer's metrics endpoint."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    step: int | None = Field(default=None, ge=0)
    """Last completed optimizer step."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps of the whole run."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Training throughput over all processes."""
    eta: str | None = None
    """Estimated time to the end of training, e.g. 14h02m."""
    last_step_time: datetime | None = None
    """When the last step completed; no change for spec.stallTimeout restarts the attempt."""


class DatasetStatus(_Status):
    """The tokenized dataset the run trains on."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    cache_key: str | None = None
    """Content key of the cached dataset (sha256 over inputs, tokenizer and packing settings)."""
    train_tokens: int | None = Field(default=None, ge=0)
    """Tokens in the training split."""
    validation_tokens: int | None = Field(default=None, ge=0)
    """Tokens in the validation split."""
    rejected_rows: dict[str, int] = Field(default_factory=dict)
    """Rows rejected by preprocessing, by reason."""


class CheckpointStatus(_Status):
    """The newest complete checkpoint."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    step: int | None = Field(default=None, ge=0)
    """Optimizer step of the checkpoint."""
    uri: str | None = None
    """Where it is stored."""


class Outputs(_Status):
    """What the run produced."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    model: str | None = None
    """The final (or merged) model."""
    adapter: str | None = None
    """The trained adapter (adapter runs)."""


class TrainingRunStatus(_Status):
    """Observed state, written by the operator (conditions are the truth, phase is for humans)."""

    # Typed where printer columns and kstatus read it; unknown fields are preserved so that a status
    # field the operator adds later is kept rather than silently pruned by the API server.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the status describes (kstatus)."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    """Ready, Reconciling, Stalled (kstatus) and the stage conditions; one entry per type."""
    phase: str | None = None
    """Pending, Preprocessing, Sanity, Training, Merging, Succeeded, Failed or Suspended."""
    progress: Progress | None = None
    """Step, loss, throughput and ETA of the current attempt."""
    dataset: DatasetStatus | None = None
    """The tokenized dataset."""
    checkpoint: CheckpointStatus | None = None
    """The newest complete checkpoint."""
    outputs: Outputs | None = None
    """Final artifacts."""
    attempts: int | None = Field(default=None, ge=0)
    """Training attempts started so far (restarts + 1)."""


# ------------------------------------------------------------------------------------- CEL rules


@dataclass(frozen=True)
class Rule:
    """One `x-kubernetes-validations` entry, attached at `at` (a dotted path below `spec`)."""

    at: str
    rule: str
    message: str
    field_path: str | None = None

    def render(self) -> Schema:
        out: Schema = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            out["fieldPath"] = self.field_path
        return out


#: Rules at the root of the resource: only there can CEL see metadata.name. No fieldPath for the
#: name rules: the schema does not declare metadata's fields, and a fieldPath must resolve in it.
ROOT_RULES = (
    Rule(
        "(root)",
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters: child objects append "
        "suffixes — use a shorter name",
    ),
    Rule(
        "(root)",
        f"self.metadata.name.matches('{DNS1035}')",
        "metadata.name must be a DNS-1035 label (lower-case letters, digits and '-', starting "
        "with a letter) — rename the run",
    ),
    Rule(
        "(root)",
        "!has(self.spec.model.fromRun) || self.spec.model.fromRun != self.metadata.name",
        "spec.model.fromRun names this run itself — name the run whose output this run starts from",
        ".spec.model.fromRun",
    ),
)

_IMMUTABLE = tuple(
    Rule(
        name,
        "self == oldSelf",
        f"spec.{name} is immutable once the run exists — create a new TrainingRun instead",
    )
    for name in IMMUTABLE_SECTIONS
)

#: The rules of api.py's validators, in CEL. Paths below spec; "" is spec itself.
RULES: tuple[Rule, ...] = (
    *_IMMUTABLE,
    Rule(
        "model",
        "(has(self.uri) ? 1 : 0) + (has(self.architecture) ? 1 : 0) + (has(self.fromRun) ? 1 : 0)"
        " == 1",
        "spec.model needs exactly one of uri, architecture and fromRun — keep one: uri for a "
        "pretrained model, architecture to build one, fromRun to chain",
    ),
    Rule(
        "model.architecture",
        "self.hiddenSize % self.heads == 0",
        "spec.model.architecture.heads must divide hiddenSize — choose heads so that "
        "hiddenSize / heads is an integer",
        ".heads",
    ),
    Rule(
        "model.architecture",
        "!has(self.kvHeads) || self.heads % self.kvHeads == 0",
        "spec.model.architecture.kvHeads must divide heads — use a divisor of heads",
        ".kvHeads",
    ),
    Rule(
        "tokenizer",
        "!(has(self.uri) && has(self.train))",
        "spec.tokenizer.uri and spec.tokenizer.train are mutually exclusive — keep one of them",
    ),
    Rule(
        "data",
        "!has(self.validation) || self.validationFraction == 0.0",
        "spec.data.validationFraction is set together with validation files — keep validation or "
        "validationFraction, not both",
        ".validationFraction",
    ),
    Rule(
        "data",
        "self.validationFraction < 1.0",
        "spec.data.validationFraction must be below 1 — use e.g. 0.01",
        ".validationFraction",
    ),
    Rule(
        "data",
        "!has(self.chatTemplate) || self.format != 'text'",
        "spec.data.chatTemplate applies to chat and preference data only — remove it",
        ".chatTemplate",
    ),
    Rule(
        "method",
        "!has(self.dpo) || self.stage == 'dpo'",
        "spec.method.dpo is set but stage is not dpo — remove it or use stage: dpo",
        ".dpo",
    ),
    Rule(
        "training",
        "!(has(self.epochs) && has(self.maxSteps))",
        "spec.training.epochs is set together with maxSteps — keep one of them",
        ".epochs",
    ),
    Rule(
        "distributed",
        "self.offload == 'none' || self.zeroStage >= 2",
        "spec.distributed.offload needs zeroStage 2 or 3 — set zeroStage: 2 or 3",
        ".offload",
    ),
    # cross-field rules (api.cross_field_problems), on spec so they see every section
    Rule(
        "",
        "!has(self.tokenizer.train) || has(self.model.architecture)",
        "spec.tokenizer.train is only allowed with model.architecture — remove tokenizer.train; "
        "a pretrained model brings its own tokenizer",
        ".tokenizer.train",
    ),
    Rule(
        "",
        "!has(self.model.architecture) || has(self.tokenizer.train) || has(self.tokenizer.uri)",
        "a model built from spec.model.architecture needs a tokenizer — set tokenizer.train "
        "(e.g. {vocabSize: 8000}) or tokenizer.uri",
        ".tokenizer",
    ),
    Rule(
        "",
        "self.method.stage == 'pretrain' ? self.data.format == 'text' : "
        "self.method.stage == 'sft' ? self.data.format in ['text', 'chat'] : "
        "self.data.format == 'preference'",
        "spec.data.format does not fit method.stage — pretrain takes text, sft text or chat, "
        "dpo preference",
        ".data.format",
    ),
    Rule(
        "",
        "self.method.stage != 'dpo' || !has(self.model.architecture)",
        "stage dpo needs a trained policy, not random weights from spec.model.architecture — use "
        "model.uri or model.fromRun (e.g. an SFT run)",
        ".model.architecture",
    ),
    Rule(
        "",
        "self.method.stage != 'pretrain' || self.method.adapter.type == 'none'",
        "spec.method.adapter: adapters fine-tune a trained model; pretraining trains all weights — "
        "use adapter.type: none for stage pretrain",
        ".method.adapter.type",
    ),
    Rule(
        "",
        "!has(self.model.architecture) || self.method.adapter.type == 'none'",
        "spec.method.adapter: an adapter on random weights learns nothing useful — use "
        "adapter.type: none with model.architecture",
        ".method.adapter.type",
    ),
    Rule(
        "",
        "!has(self.model.architecture) || !has(self.model.architecture.vocabSize) || "
        "!has(self.tokenizer.train) || "
        "self.model.architecture.vocabSize >= self.tokenizer.train.vocabSize",
        "spec.model.architecture.vocabSize is smaller than tokenizer.train.vocabSize — remove "
        "vocabSize (it follows the tokenizer) or make it at least the tokenizer's",
        ".model.architecture.vocabSize",
    ),
    Rule(
        "",
        "!has(self.model.architecture) || "
        "self.data.blockSize <= self.model.architecture.contextLength",
        "spec.data.blockSize exceeds model.architecture.contextLength — lower blockSize or raise "
        "contextLength",
        ".data.blockSize",
    ),
    Rule(
        "",
        "!self.training.optimizer.endsWith('_8bit') || self.distributed.zeroStage == 0 || "
        "self.resources.nodes * "
        "(self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1) == 1",
        "spec.training.optimizer: 8-bit optimizer state is not sharded by DeepSpeed ZeRO on more "
        "than one process — use adamw_torch, or zeroStage: 0",
        ".training.optimizer",
    ),
    Rule(
        "",
        "self.training.precision != 'fp16' || self.resources.gpusPerNode > 0",
        "spec.training.precision fp16 needs a GPU (resources.gpusPerNode is 0) — use bf16 or "
        "fp32 on CPU",
        ".training.precision",
    ),
    Rule(
        "",
        "!has(self.sanity) || !has(self.sanity.gpus) || "
        "self.sanity.gpus <= self.resources.nodes * self.resources.gpusPerNode",
        "spec.sanity.gpus exceeds the run's GPUs (nodes × gpusPerNode) — use at most that many",
        ".sanity.gpus",
    ),
    Rule(
        "",
        "!has(self.sanity) || !has(self.sanity.gpus) || "
        "self.sanity.gpus <= self.resources.gpusPerNode",
        "spec.sanity.gpus exceeds resources.gpusPerNode: the gate runs in one pod on one node — "
        "use at most gpusPerNode",
        ".sanity.gpus",
    ),
    Rule(
        "",
        "!self.output.merge || self.method.adapter.type != 'none'",
        "spec.output.merge: there is no adapter to merge (method.adapter.type is none) — remove "
        "output.merge, or train an adapter (lora or qlora)",
        ".output.merge",
    ),
    Rule(
        "",
        "!self.output.merge || !self.model.quantized",
        "spec.output.merge: the base at model.uri is declared quantized and merging into a 4-bit "
        "base corrupts the model — point model.uri at the full-precision base",
        ".output.merge",
    ),
    Rule(
        "",
        "self.method.adapter.type != 'qlora' || self.training.precision != 'fp32' || "
        "self.resources.gpusPerNode == 0",
        "spec.training.precision: qlora computes in bf16 or fp16 on GPUs — use bf16",
        ".training.precision",
    ),
)

#: On every URI field (api.Uri, recognised by its pattern): api.check_uri's scheme allowlist. The
#: items of data.train/validation cannot carry it (see the module docstring).
URI_SCHEME_RULE = Rule(
    "",
    "!self.matches('^[A-Za-z][A-Za-z0-9+.-]*://') || "
    f"self.matches('^({'|'.join(URI_SCHEMES)})://')",
    "the URI scheme is not supported — use "
    f"{', '.join(s + '://' for s in URI_SCHEMES)} or a local path",
)

#: Kubernetes list semantics the model states in Python: duplicates are refused by the API server.
LIST_TYPES = {"tokenizer.train.specialTokens": "set"}


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
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
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
    if (is_field or node.get("type") == "object") and not description:
        raise CRDGenerationError(
            f"{where} has no description — add a docstring under the field (or the class) in api.py"
        )
    if node.pop("x-kubetrain-one-or-many", False):
        return {
            "description": f"{description} (A string or a list of strings.)",
            "x-kubernetes-preserve-unknown-fields": True,
        }
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
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
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
    """`spec`: the model's schema, structural, with the CEL rules and list types attached."""
    schema = _model_schema(TrainingRunSpec, "spec")
    for at, list_type in LIST_TYPES.items():
        _attach(schema, at, "x-kubernetes-list-type", list_type)
    for rule in RULES:
        _attach(schema, rule.at, "x-kubernetes-validations", rule.render())
    for uri in _uri_nodes(schema):
        _attach(uri, "", "x-kubernetes-validations", URI_SCHEME_RULE.render())
    return schema


def _uri_nodes(node: Schema) -> list[Schema]:
    """Every string node that is an api.Uri, in schema order."""
    found = [node] if node.get("type") == "string" and node.get("pattern") == URI_PATTERN else []
    for child in node.get("properties", {}).values():
        found += _uri_nodes(child)
    if "items" in node:
        found += _uri_nodes(node["items"])
    return found


def status_schema() -> Schema:
    """`status`: typed where printer columns and kstatus read it, open for fields added later."""
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
        "x-kubernetes-validations": [rule.render() for rule in ROOT_RULES],
    }
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
