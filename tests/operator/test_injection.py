"""Injection: hostile strings in every string field of a TrainingRun never reach a shell or an argv.

Real: `parse_run` (the API's validation), `plan_run`, `render_all` and PyYAML's safe dump/load as
`kubetrain render` uses them. The fields are found by walking the model's own JSON schema, so a new
string field is covered (or this test fails until a base document sets it). Each hostile string is
put into each field (replacing the value, appended to it, and as an extra list item / map key) and
must either be refused by validation or arrive only inside the stage config JSON, intact — never in
a container command/args item, an env value, a label, a name or anywhere else in an object.
Nothing is emulated; nothing is executed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetrain_operator.api import InvalidRun, SpecError, TrainingRun
from runspecs import all_containers, pod_templates, rendered, string_leaves

PAYLOADS = [
    "$(touch /tmp/pwned)",
    "$(touch${IFS}pwned)",
    "`touch pwned`",
    "; touch pwned",
    ";touch${IFS}pwned",
    "&& touch pwned",
    "&&touch",
    "| touch pwned",
    "|touch",
    "\ntouch pwned",
    "a\nb",
    "'",
    '"',
    "\"'$(id)'\"",
    "${HOME}",
    "\\",
    "\r\n",
    "--config=/etc/passwd",
    ">/etc/passwd",
]

UPSTREAM = {
    "apiVersion": "kubetrain.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "upstream-sft"},
    "spec": {
        "model": {"uri": "s3://models/base"},
        "data": {"format": "chat", "train": ["s3://d/chat.jsonl"]},
        "method": {"stage": "sft", "adapter": {"type": "lora"}},
        "output": {"uri": "s3://runs/upstream-sft/", "merge": True},
    },
}

#: Together these set every string field of the API (checked below against the schema).
BASES: dict[str, dict[str, Any]] = {
    "finetune": {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {
            "name": "inj-finetune",
            "namespace": "team",
            "uid": "0f9c",
            "labels": {"team": "ml"},
            "annotations": {"note": "hello"},
        },
        "spec": {
            "model": {"uri": "s3://models/base"},
            "tokenizer": {"uri": "s3://models/tokenizer"},
            "data": {
                "format": "chat",
                "train": ["s3://d/a.jsonl", "s3://d/b/*.jsonl"],
                "validation": ["pvc://datasets/val.jsonl"],
                "textField": "body",
                "messagesField": "msgs",
                "promptField": "p",
                "chosenField": "c",
                "rejectedField": "r",
                "chatTemplate": "tulu",
                "blockSize": 128,
            },
            "method": {"stage": "sft", "adapter": {"type": "lora", "targetModules": ["q_proj"]}},
            "training": {"maxSteps": 10, "learningRate": 1.0e-4},
            "resources": {
                "nodes": 2,
                "gpusPerNode": 2,
                "gpuResource": "nvidia.com/gpu",
                "cpu": "4",
                "memory": "16Gi",
                "sharedMemory": "2Gi",
                "preprocess": {"cpu": "2", "memory": "8Gi"},
                "merge": {"cpu": "2", "memory": "32Gi", "gpus": 1},
                "nodeSelector": {"node-type": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}],
            },
            "sanity": {"rungs": [{"gpus": 1, "optimizer": "adamw_torch"}, {"gpus": 2}]},
            "output": {
                "uri": "pvc://outputs/runs/x",
                "merge": True,
                "push": {"hub": "org/tuned", "private": False, "revision": "release"},
            },
            "storage": {
                "s3": {
                    "secretName": "s3-creds",
                    "accessKeyIdKey": "id",
                    "secretAccessKeyKey": "key",
                    "endpoint": "http://minio:9000",
                    "allowInsecureEndpoint": True,
                    "region": "us-east-1",
                },
                "hf": {"secretName": "hf-creds", "tokenKey": "token", "endpoint": "https://hub"},
                "cacheRoot": "s3://cache/kubetrain",
            },
            "image": "registry.example/trainer:1",
            "stallTimeout": "20m",
            "stageDeadline": "12h",
            "queueName": "team-q",
        },
    },
    "pretrain": {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "inj-pretrain"},
        "spec": {
            "model": {
                "architecture": {"hiddenSize": 64, "layers": 2, "heads": 4, "contextLength": 128}
            },
            "tokenizer": {"train": {"vocabSize": 1024, "specialTokens": ["<|endoftext|>", "<p>"]}},
            "data": {
                "format": "text",
                "sources": [
                    {"name": "corpus", "uri": "s3://corpus/", "exclude": ["*/old/*"]},
                    {
                        "name": "hub",
                        "uri": "hf://datasets/org/name@main",
                        "config": "default",
                        "split": "train",
                        "files": ["data/*.parquet"],
                        "fraction": 0.5,
                    },
                ],
                "validationSources": [
                    {
                        "name": "held",
                        "uri": "hf://datasets/org/held",
                        "exclude": ["*/old/*"],
                        "config": "default",
                        "split": "validation",
                        "files": ["data/*.jsonl"],
                    }
                ],
                "documentSeparator": "<|endoftext|>",
                "blockSize": 128,
            },
            "method": {"stage": "pretrain"},
            "training": {"maxSteps": 10, "precision": "fp32"},
            "resources": {"gpusPerNode": 0},
            "output": {"uri": "s3://runs/inj-pretrain"},
        },
    },
    "dpo": {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "inj-dpo"},
        "spec": {
            "model": {"fromRun": "upstream-sft"},
            "tokenizer": {"uri": "hf://org/tokenizer@main"},
            "data": {"format": "preference", "train": ["s3://d/prefs.jsonl"]},
            "method": {"stage": "dpo", "dpo": {"beta": 0.1}},
            "output": {"uri": "s3://runs/inj-dpo"},
        },
    },
}


def schema_string_fields() -> set[str]:
    """Paths of every free-form string in the TrainingRun schema (enums and consts excluded)."""
    schema = TrainingRun.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    found: set[str] = set()

    def walk(node: dict[str, Any], path: str) -> None:
        while "$ref" in node:
            node = defs[node["$ref"].rpartition("/")[2]]
        for alternative in node.get("anyOf", []) + node.get("oneOf", []) + node.get("allOf", []):
            walk(alternative, path)
        if node.get("type") == "string" and "enum" not in node and "const" not in node:
            found.add(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}" if path else key)
        if isinstance(node.get("additionalProperties"), dict):
            found.add(f"{path}.{{key}}")
            walk(node["additionalProperties"], f"{path}.{{}}")
        if node.get("type") == "array":
            walk(node.get("items", {}), f"{path}[]")

    walk(schema, "")
    return found


#: Free-form maps (labels, annotations, nodeSelector): their keys are user strings too.
MAPS = {
    tuple(path.removesuffix(".{key}").split("."))
    for path in schema_string_fields()
    if path.endswith(".{key}")
}


def leaf_paths(doc: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(location, kind) of every string value, map key and list of strings in a document."""

    def walk(
        node: Any, loc: tuple[Any, ...], in_map: bool
    ) -> Iterator[tuple[tuple[Any, ...], str]]:
        if isinstance(node, str):
            yield loc, "value"
        elif isinstance(node, dict):
            for key, value in node.items():
                if in_map:
                    yield (*loc, key), "key"
                yield from walk(value, (*loc, key), False)
        elif isinstance(node, list):
            if node and all(isinstance(i, str) for i in node):
                yield loc, "list"
            for index, item in enumerate(node):
                yield from walk(item, (*loc, index), False)

    def walk_doc(node: Any, loc: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
        if isinstance(node, dict) and loc not in MAPS:
            for key, value in node.items():
                yield from walk_doc(value, (*loc, key))
        else:
            yield from walk(node, loc, loc in MAPS)

    yield from walk_doc(doc, ())


def schema_path(loc: tuple[Any, ...], kind: str) -> str:
    """A document location as :func:`schema_string_fields` names it."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] += "[]"
        elif loc[:i] in MAPS:
            parts.append("{key}" if kind == "key" and i == len(loc) - 1 else "{}")
        else:
            parts.append(part)
    return ".".join(parts)


def mutations(doc: dict[str, Any], payload: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(where, mutated document, the hostile string now in it)."""
    for loc, kind in leaf_paths(doc):
        where = "/".join(map(str, loc))
        parent_loc, last = loc[:-1], loc[-1]
        if kind == "key":
            out = copy.deepcopy(doc)
            parent = get(out, parent_loc)
            parent[str(last) + payload] = parent.pop(last)
            yield f"{where} (key)", out, str(last) + payload
        elif kind == "list":
            out = copy.deepcopy(doc)
            get(out, loc).append(payload)
            yield f"{where} (+item)", out, payload
        else:
            original = get(doc, loc)
            for mode, value in (("=", payload), ("+=", original + payload)):
                out = copy.deepcopy(doc)
                get(out, parent_loc)[last] = value
                yield f"{where} {mode}", out, value


def get(node: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        node = node[part]
    return node


def render(doc: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The objects of an accepted document, or None when validation (or the plan) refuses it."""
    try:
        return rendered(doc, upstream=UPSTREAM)
    except (InvalidRun, SpecError):
        return None


def test_bases_are_valid_and_cover_every_string_field() -> None:
    covered = set()
    for doc in BASES.values():
        assert render(doc) is not None
        for loc, kind in leaf_paths(doc):
            covered.add(schema_path(loc, kind))
    assert ("spec", "resources", "nodeSelector") in MAPS
    assert schema_string_fields() - covered == set()


def config_strings(objects: list[dict[str, Any]]) -> list[str]:
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    values: list[str] = []
    for text in config_map["data"].values():
        tree = json.loads(text)
        for path, value in string_leaves(tree):
            if path.endswith(".{key}"):
                assert value.isidentifier() or value.replace("_", "").isalnum(), value
            else:
                values.append(value)
    return values


def violations(objects: list[dict[str, Any]], payload: str, value: str) -> list[str]:
    problems = []
    for obj in objects:
        for path, text in string_leaves(obj):
            in_config = (
                obj["kind"] == "ConfigMap" and path.startswith("data.") and "{key}" not in path
            )
            if payload in text and not in_config:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} {path}")
        for _, template in pod_templates(obj):
            for c in all_containers(template["spec"]):
                for item in c.get("command", []) + c.get("args", []):
                    if payload in item:
                        problems.append(f"argv item {item!r}")
    strings = config_strings(objects)
    carried = [s for s in strings if payload in s]
    # Whatever arrived in the configs arrived whole: the user's value (pvc:// mapped to its
    # mount) inside a JSON string, not split, escaped or reassembled.
    core = value.removeprefix("pvc://").rstrip("/")
    for text in carried:
        if core not in text and payload.strip() not in text:
            problems.append(f"config value {text!r} does not carry {value!r} intact")
    return problems


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_hostile_strings_are_refused_or_stay_in_the_config_json(payload: str) -> None:
    accepted, problems = [], []
    for base_id, base in BASES.items():
        for where, doc, value in mutations(base, payload):
            objects = render(doc)
            if objects is None:
                continue
            if not any(a.startswith(f"{base_id}:") for a in accepted):
                # The YAML `kubetrain render` prints (same dumper settings) reads back intact.
                (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
                text = yaml.safe_dump_all([config_map], sort_keys=False, width=100)
                assert list(yaml.safe_load_all(text)) == [config_map]
            accepted.append(f"{base_id}:{where}")
            problems += [f"{base_id}:{where}: {p}" for p in violations(objects, payload, value)]
    assert problems == []
    # Hostile strings are legal in some places (an S3 key may contain `;`, a special token
    # anything): make sure some did get through, so the checks above were exercised.
    assert accepted


def test_pod_facing_fields_refuse_hostile_strings() -> None:
    """Fields that land in pod specs (not the config JSON) must refuse every hostile string."""
    pod_facing = {
        "metadata/name",
        "spec/image",
        "spec/queueName",
        "spec/stallTimeout",
        "spec/stageDeadline",
        "spec/resources/gpuResource",
        "spec/resources/cpu",
        "spec/resources/memory",
        "spec/resources/sharedMemory",
        "spec/resources/nodeSelector/node-type",
        "spec/resources/tolerations/0/key",
        "spec/resources/tolerations/0/value",
        "spec/storage/s3/secretName",
        "spec/storage/s3/accessKeyIdKey",
        "spec/storage/s3/secretAccessKeyKey",
        "spec/storage/hf/secretName",
        "spec/storage/hf/tokenKey",
        "spec/storage/hf/endpoint",
        "spec/resources/preprocess/cpu",
        "spec/resources/preprocess/memory",
        "spec/resources/merge/cpu",
        "spec/resources/merge/memory",
        "spec/model/fromRun",
    }
    accepted = []
    for payload in PAYLOADS:
        for base in BASES.values():
            for where, doc, _ in mutations(base, payload):
                if where.rsplit(" ", 1)[0] in pod_facing and render(doc) is not None:
                    accepted.append((where, payload))
    assert accepted == []
