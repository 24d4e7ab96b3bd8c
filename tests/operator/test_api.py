"""The TrainingRun API: what `api.parse_run` accepts, defaults and refuses; and the CRD agrees.

Real: `kubetrain_operator.api.parse_run` (the pydantic model the operator and `kubetrain validate`
use); the generated CRD's `openAPIV3Schema` checked by `openapi_schema_validator.OAS30Validator`;
the CRD's CEL rules evaluated by `cel-python`.

Emulated (standin/crd_emulation.py): the API server's defaulting before validation, and strict field
validation — unknown fields are refused by adding `additionalProperties: false` to a COPY of the
schema (the CRD itself must not carry it); list-type `set` duplicates.

Each invalid case is one test id: a small valid base plus a deep-merge patch. Every case asserts the
exact field path of the model's problem and that the message says what to do (text after "—").
Each case also says which part of the CRD refuses it — "schema" (types, enums, ranges, patterns,
required and unknown fields), "cel" (a CEL rule) or "model" (only the operator: the CRD cannot
express it) — and the test checks that claim both ways, so the table cannot drift from the CRD.
Every CEL rule the CRD carries (the table of kubetrain_operator.rules, field rules on URIs
included) is shown to refuse at least one case.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import yaml

from kubetrain_operator import api, crd, rules
from standin import crd_emulation as kube

ROOT = Path(__file__).resolve().parents[2]
DELETE = object()  # a patch value that removes the key


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`base` with `patch` deep-merged in: dicts merge, other values replace, DELETE removes."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: A data source with terms, and a validation source.
SOURCE: dict[str, Any] = {"name": "policies", "uri": "s3://d/policy/", "fraction": 0.5}
VSOURCE: dict[str, Any] = {"name": "held-out", "uri": "s3://d/held/"}
#: A valid fine-tune with as little as possible: everything else comes from defaults.
BASE: dict[str, Any] = {
    "apiVersion": "kubetrain.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "policy-sft"},
    "spec": {
        "model": {"uri": "s3://models/base"},
        "data": {"format": "text", "train": ["s3://datasets/train.jsonl"]},
        "method": {"stage": "sft"},
        "output": {"uri": "s3://runs/policy-sft/"},
    },
}
#: A valid pretraining run from scratch with a trained tokenizer.
SCRATCH = merge(
    BASE,
    {
        "metadata": {"name": "scratch"},
        "spec": {
            "model": {
                "uri": DELETE,
                "architecture": {"hiddenSize": 64, "layers": 2, "heads": 4, "contextLength": 128},
            },
            "tokenizer": {"train": {"vocabSize": 1024}},
            "data": {"blockSize": 128},
            "method": {"stage": "pretrain"},
        },
    },
)


def spec(**sections: Any) -> dict[str, Any]:
    return {"spec": sections}


@dataclass(frozen=True)
class Case:
    id: str
    patch: dict[str, Any]
    path: str  # the exact path of the model's problem
    refused_by: Literal["schema", "cel", "model"]
    base: dict[str, Any] = field(default_factory=lambda: BASE)
    crd_path: str | None = None  # where the CRD reports it, when not at `path`

    @property
    def doc(self) -> dict[str, Any]:
        return merge(self.base, self.patch)


CASES = [
    # ---- unknown and missing fields (strict field validation on the API server)
    Case("unknown-field", spec(training={"learningrate": 1e-4}), "spec.training.learningrate",
         "schema", crd_path="spec.training"),
    Case("unknown-spec-field", spec(gpus=8), "spec.gpus", "schema", crd_path="spec"),
    Case("unknown-field-in-list-item",
         spec(resources={"tolerations": [{"key": "gpu", "efect": "NoSchedule"}]}),
         "spec.resources.tolerations[0].efect", "schema", crd_path="spec.resources.tolerations[0]"),
    Case("missing-output", spec(output=DELETE), "spec.output", "schema", crd_path="spec"),
    Case("missing-data-format", spec(data={"format": DELETE}), "spec.data.format", "schema",
         crd_path="spec.data"),
    Case("missing-architecture-heads", spec(model={"architecture": {"heads": DELETE}}),
         "spec.model.architecture.heads", "schema", base=SCRATCH,
         crd_path="spec.model.architecture"),
    # ---- wrong types
    Case("type-integer", spec(training={"microBatchSize": "four"}),
         "spec.training.microBatchSize", "schema"),
    Case("type-number", spec(training={"learningRate": "fast"}), "spec.training.learningRate",
         "schema"),
    Case("type-boolean", spec(suspend="maybe"), "spec.suspend", "schema"),
    Case("type-object", spec(method="sft"), "spec.method", "schema"),
    Case("type-list", spec(method={"adapter": {"type": "lora", "targetModules": "q_proj"}}),
         "spec.method.adapter.targetModules", "schema"),
    Case("type-map", spec(resources={"nodeSelector": ["gpu"]}), "spec.resources.nodeSelector",
         "schema"),
    # ---- enums
    Case("enum-format", spec(data={"format": "csv"}), "spec.data.format", "schema"),
    Case("enum-stage", spec(method={"stage": "rlhf"}), "spec.method.stage", "schema"),
    Case("enum-precision", spec(training={"precision": "fp8"}), "spec.training.precision",
         "schema"),
    Case("enum-optimizer", spec(training={"optimizer": "lion"}), "spec.training.optimizer",
         "schema"),
    Case("enum-adapter-type", spec(method={"adapter": {"type": "dora"}}),
         "spec.method.adapter.type", "schema"),
    Case("enum-scheduler", spec(training={"lrScheduler": "exponential"}),
         "spec.training.lrScheduler", "schema"),
    Case("enum-offload", spec(distributed={"zeroStage": 3, "offload": "nvme"}),
         "spec.distributed.offload", "schema"),
    Case("enum-chat-template", spec(data={"format": "chat", "chatTemplate": "vicuna"}),
         "spec.data.chatTemplate", "schema"),
    Case("enum-family", spec(model={"architecture": {"family": "gpt2"}}),
         "spec.model.architecture.family", "schema", base=SCRATCH),
    # ---- ranges: ≥ 1 where a count is needed, > 0 where zero makes no sense
    Case("zero-micro-batch", spec(training={"microBatchSize": 0}),
         "spec.training.microBatchSize", "schema"),
    Case("zero-gradient-accumulation", spec(training={"gradientAccumulationSteps": 0}),
         "spec.training.gradientAccumulationSteps", "schema"),
    Case("zero-block-size", spec(data={"blockSize": 0}), "spec.data.blockSize", "schema"),
    Case("zero-every-steps", spec(checkpoints={"everySteps": 0}), "spec.checkpoints.everySteps",
         "schema"),
    Case("zero-keep", spec(checkpoints={"keep": 0}), "spec.checkpoints.keep", "schema"),
    Case("zero-nodes", spec(resources={"nodes": 0}), "spec.resources.nodes", "schema"),
    Case("negative-gpus", spec(resources={"gpusPerNode": -1}), "spec.resources.gpusPerNode",
         "schema"),
    Case("too-many-gpus-per-node", spec(resources={"gpusPerNode": 17}),
         "spec.resources.gpusPerNode", "schema"),
    Case("zero-stage-4", spec(distributed={"zeroStage": 4}), "spec.distributed.zeroStage",
         "schema"),
    Case("zero-learning-rate", spec(training={"learningRate": 0}), "spec.training.learningRate",
         "schema"),
    Case("zero-heads", spec(model={"architecture": {"heads": 0}}),
         "spec.model.architecture.heads", "schema", base=SCRATCH),
    Case("zero-lora-rank", spec(method={"adapter": {"type": "lora", "r": 0}}),
         "spec.method.adapter.r", "schema"),
    Case("negative-max-restarts", spec(maxRestarts=-1), "spec.maxRestarts", "schema"),
    Case("negative-seed", spec(training={"seed": -1}), "spec.training.seed", "schema"),
    Case("one-sanity-step", spec(sanity={"steps": 1}), "spec.sanity.steps", "schema"),
    Case("tokenizer-vocab-below-512", spec(tokenizer={"train": {"vocabSize": 511}}),
         "spec.tokenizer.train.vocabSize", "schema", base=SCRATCH),
    # ---- fractions are in [0, 1]
    Case("fraction-above-one", spec(data={"maxRejectedFraction": 1.5}),
         "spec.data.maxRejectedFraction", "schema"),
    Case("fraction-negative", spec(method={"adapter": {"type": "lora", "dropout": -0.1}}),
         "spec.method.adapter.dropout", "schema"),
    Case("warmup-ratio-two", spec(training={"warmupRatio": 2}), "spec.training.warmupRatio",
         "schema"),
    Case("validation-fraction-negative", spec(data={"validationFraction": -0.5}),
         "spec.data.validationFraction", "schema"),
    Case("min-loss-drop-above-one", spec(sanity={"minLossDrop": 1.1}),
         "spec.sanity.minLossDrop", "schema"),
    # ---- patterns: quantities, durations, names, and strings that could reach a shell
    Case("quantity-with-space", spec(resources={"memory": "48 GB"}), "spec.resources.memory",
         "schema"),
    Case("quantity-word", spec(resources={"cpu": "eight"}), "spec.resources.cpu", "schema"),
    Case("duration-in-words", spec(stallTimeout="15 minutes"), "spec.stallTimeout", "schema"),
    Case("duration-empty", spec(stallTimeout=""), "spec.stallTimeout", "schema"),
    Case("queue-name-not-dns", spec(queueName="GPU Team"), "spec.queueName", "schema"),
    Case("image-with-shell", spec(image="trainer:latest; rm -rf /"), "spec.image", "schema"),
    Case("gpu-resource-without-domain", spec(resources={"gpuResource": "gpu"}),
         "spec.resources.gpuResource", "schema"),
    Case("s3-endpoint-not-http", spec(storage={"s3": {"endpoint": "ftp://minio:9000"}}),
         "spec.storage.s3.endpoint", "schema"),
    Case("s3-endpoint-with-credentials",
         spec(storage={"s3": {"endpoint": "https://key:secret@minio:9000"}}),
         "spec.storage.s3.endpoint", "schema"),
    Case("from-run-not-dns-1035", spec(model={"uri": DELETE, "fromRun": "Run_1"}),
         "spec.model.fromRun", "schema"),
    Case("uri-newline", spec(model={"uri": "s3://models/x\nrm -rf /"}), "spec.model.uri",
         "schema"),
    Case("uri-control-character", spec(output={"uri": "s3://runs/\x1b[31mred"}),
         "spec.output.uri", "schema"),
    Case("uri-tab", spec(tokenizer={"uri": "s3://tok/\tx"}), "spec.tokenizer.uri", "schema"),
    Case("uri-space", spec(storage={"cacheRoot": "s3://cache/a b"}), "spec.storage.cacheRoot",
         "schema"),
    Case("field-name-with-shell", spec(data={"textField": "$(touch pwned)"}),
         "spec.data.textField", "schema"),
    Case("target-module-with-shell",
         spec(method={"adapter": {"type": "lora", "targetModules": ["q_proj", "`id`"]}}),
         "spec.method.adapter.targetModules[1]", "schema"),
    Case("node-selector-value-with-space", spec(resources={"nodeSelector": {"pool": "a b"}}),
         "spec.resources.nodeSelector.pool", "schema"),
    Case("special-tokens-duplicated",
         spec(tokenizer={"train": {"vocabSize": 1024, "specialTokens": ["<s>", "<s>"]}}),
         "spec.tokenizer.train.specialTokens", "schema", base=SCRATCH,
         crd_path="spec.tokenizer.train.specialTokens[1]"),
    # ---- metadata.name (root CEL rules: the schema cannot restrict metadata further)
    Case("name-over-50", {"metadata": {"name": "a" * 51}}, "metadata.name", "cel", crd_path=""),
    Case("name-not-dns-1035", {"metadata": {"name": "9lives"}}, "metadata.name", "cel",
         crd_path=""),
    Case("name-with-dot", {"metadata": {"name": "policy.sft"}}, "metadata.name", "cel",
         crd_path=""),
    # ---- one source of weights
    Case("model-none", spec(model={"uri": DELETE}), "spec.model", "cel"),
    Case("model-uri-and-from-run", spec(model={"fromRun": "other-run"}), "spec.model", "cel"),
    Case("model-uri-and-architecture",
         spec(model={"uri": "s3://models/base"}), "spec.model", "cel", base=SCRATCH),
    Case("from-run-names-itself", spec(model={"uri": DELETE, "fromRun": "policy-sft"}),
         "spec.model.fromRun", "cel"),
    # ---- tokenizer
    Case("tokenizer-uri-and-train", spec(tokenizer={"uri": "s3://tok/x"}), "spec.tokenizer",
         "cel", base=SCRATCH),
    Case("tokenizer-train-without-architecture", spec(tokenizer={"train": {"vocabSize": 1024}}),
         "spec.tokenizer.train", "cel"),
    Case("architecture-without-tokenizer", spec(tokenizer=DELETE), "spec.tokenizer", "cel",
         base=SCRATCH),
    Case("architecture-vocab-below-tokenizer",
         spec(model={"architecture": {"vocabSize": 600}}), "spec.model.architecture.vocabSize",
         "cel", base=SCRATCH),
    Case("heads-do-not-divide-hidden-size", spec(model={"architecture": {"heads": 3}}),
         "spec.model.architecture.heads", "cel", base=SCRATCH),
    Case("kv-heads-do-not-divide-heads", spec(model={"architecture": {"kvHeads": 3}}),
         "spec.model.architecture.kvHeads", "cel", base=SCRATCH),
    Case("block-size-over-context", spec(data={"blockSize": 256}), "spec.data.blockSize", "cel",
         base=SCRATCH),
    # ---- stage ↔ format, and what each stage needs
    Case("pretrain-on-chat", spec(method={"stage": "pretrain"}, data={"format": "chat"}),
         "spec.data.format", "cel"),
    Case("sft-on-preference", spec(data={"format": "preference"}), "spec.data.format", "cel"),
    Case("dpo-on-text", spec(method={"stage": "dpo"}), "spec.data.format", "cel"),
    Case("dpo-on-random-weights",
         spec(method={"stage": "dpo"}, data={"format": "preference"}),
         "spec.model.architecture", "cel", base=SCRATCH),
    Case("pretrain-with-adapter",
         spec(method={"stage": "pretrain", "adapter": {"type": "lora"}}),
         "spec.method.adapter.type", "cel"),
    Case("adapter-on-random-weights",
         spec(method={"stage": "sft", "adapter": {"type": "lora"}}),
         "spec.method.adapter.type", "cel", base=SCRATCH),
    Case("dpo-settings-without-dpo", spec(method={"dpo": {"beta": 0.1}}), "spec.method.dpo",
         "cel"),
    # ---- data
    Case("validation-files-and-fraction",
         spec(data={"validation": ["s3://datasets/val.jsonl"], "validationFraction": 0.1}),
         "spec.data.validationFraction", "cel"),
    Case("validation-fraction-one", spec(data={"validationFraction": 1}),
         "spec.data.validationFraction", "cel"),
    Case("chat-template-on-text", spec(data={"chatTemplate": "tulu"}), "spec.data.chatTemplate",
         "cel"),
    # ---- training and distribution
    Case("epochs-and-max-steps", spec(training={"epochs": 1, "maxSteps": 100}),
         "spec.training.epochs", "cel"),
    Case("8bit-optimizer-zero-on-8-gpus",
         spec(training={"optimizer": "adamw_8bit"}, distributed={"zeroStage": 2},
              resources={"gpusPerNode": 8}),
         "spec.training.optimizer", "cel"),
    Case("8bit-optimizer-zero-on-2-cpu-nodes",
         spec(training={"optimizer": "paged_adamw_8bit"}, distributed={"zeroStage": 1},
              resources={"nodes": 2, "gpusPerNode": 0}),
         "spec.training.optimizer", "cel"),
    Case("fp16-on-cpu", spec(training={"precision": "fp16"}, resources={"gpusPerNode": 0}),
         "spec.training.precision", "cel"),
    Case("qlora-in-fp32-on-gpu",
         spec(method={"adapter": {"type": "qlora"}}, training={"precision": "fp32"}),
         "spec.training.precision", "cel"),
    Case("offload-without-zero-2", spec(distributed={"zeroStage": 1, "offload": "cpu"}),
         "spec.distributed.offload", "cel"),
    Case("bf16-weights-with-fp32-compute",
         spec(training={"weightPrecision": "bf16", "precision": "fp32"}),
         "spec.training.weightPrecision", "cel"),
    Case("flash-attention-on-cpu",
         spec(training={"attention": "flash_attention_2"}, resources={"gpusPerNode": 0}),
         "spec.training.attention", "cel"),
    Case("flash-attention-in-fp32",
         spec(training={"attention": "flash_attention_2", "precision": "fp32"}),
         "spec.training.attention", "cel"),
    Case("attention-unknown", spec(training={"attention": "xformers"}),
         "spec.training.attention", "schema"),
    Case("gpu-memory-not-a-quantity", spec(resources={"gpuMemory": "80 GB"}),
         "spec.resources.gpuMemory", "schema"),
    Case("sanity-gpus-over-the-run", spec(sanity={"gpus": 2}), "spec.sanity.gpus", "cel"),
    Case("sanity-gpus-not-whole-nodes",
         spec(sanity={"gpus": 3}, resources={"nodes": 2, "gpusPerNode": 2}),
         "spec.sanity.gpus", "cel"),
    Case("qlora-with-zero-3", spec(method={"adapter": {"type": "qlora"}},
                                   distributed={"zeroStage": 3}),
         "spec.distributed.zeroStage", "cel"),
    Case("merge-gpu-on-cpu-run", spec(resources={"gpusPerNode": 0, "merge": {"gpus": 1}}),
         "spec.resources.merge.gpus", "cel"),
    Case("quantity-negative-int", spec(resources={"cpu": -4}), "spec.resources.cpu", "cel"),
    Case("quantity-float", spec(resources={"preprocess": {"cpu": 0.5}}),
         "spec.resources.preprocess.cpu", "schema"),
    # ---- the sanity ladder: the same rules on every rung, overrides included
    Case("rungs-and-single-gate", spec(sanity={"steps": 10, "rungs": [{"gpus": 1}]}),
         "spec.sanity.rungs", "cel"),
    Case("rung-gpus-over-the-run", spec(sanity={"rungs": [{"gpus": 1}, {"gpus": 2}]}),
         "spec.sanity.rungs[1].gpus", "cel", crd_path="spec.sanity.rungs"),
    Case("rung-gpus-not-whole-nodes",
         spec(resources={"nodes": 2, "gpusPerNode": 4}, sanity={"rungs": [{"gpus": 6}]}),
         "spec.sanity.rungs[0].gpus", "cel", crd_path="spec.sanity.rungs"),
    Case("rung-8bit-on-2-gpus-zero-3",
         spec(resources={"gpusPerNode": 2}, distributed={"zeroStage": 3},
              sanity={"rungs": [{"gpus": 1, "zeroStage": 0, "optimizer": "paged_adamw_8bit"},
                                {"gpus": 2, "optimizer": "paged_adamw_8bit"}]}),
         "spec.sanity.rungs[1].optimizer", "cel", crd_path="spec.sanity.rungs"),
    Case("single-gate-override-8bit-on-2-gpus",
         spec(resources={"gpusPerNode": 2}, distributed={"zeroStage": 3},
              sanity={"gpus": 2, "optimizer": "adamw_8bit"}),
         "spec.sanity.optimizer", "cel"),
    Case("single-gate-fp16-on-cpu", spec(training={"precision": "fp16"}, sanity={"gpus": 0}),
         "spec.sanity.gpus", "cel"),
    Case("rung-fp16-on-cpu",
         spec(training={"precision": "fp16"}, sanity={"rungs": [{"gpus": 0}, {"gpus": 1}]}),
         "spec.sanity.rungs[0].gpus", "cel", crd_path="spec.sanity.rungs"),
    Case("rung-offload-without-zero-2",
         spec(resources={"gpusPerNode": 2}, distributed={"zeroStage": 3},
              sanity={"rungs": [{"gpus": 2, "zeroStage": 1, "offload": "cpu"}]}),
         "spec.sanity.rungs[0].offload", "cel", crd_path="spec.sanity.rungs"),
    Case("single-gate-offload-without-zero-2",
         spec(sanity={"gpus": 1, "offload": "cpu"}),
         "spec.sanity.offload", "cel"),
    Case("rung-zero-stage-4", spec(sanity={"rungs": [{"zeroStage": 4}]}),
         "spec.sanity.rungs[0].zeroStage", "schema"),
    Case("rung-unknown-optimizer", spec(sanity={"rungs": [{"optimizer": "lion"}]}),
         "spec.sanity.rungs[0].optimizer", "schema"),
    Case("too-many-rungs", spec(sanity={"rungs": [{}] * 9}), "spec.sanity.rungs", "schema"),
    # ---- output
    Case("merge-without-adapter", spec(output={"merge": True}), "spec.output.merge", "cel"),
    Case("merge-into-quantized-base",
         spec(model={"quantized": True}, method={"adapter": {"type": "qlora"}},
              output={"merge": True}),
         "spec.output.merge", "cel"),
    # ---- URI schemes (a CEL rule on every URI field the CRD can type)
    Case("model-uri-ftp", spec(model={"uri": "ftp://host/model"}), "spec.model.uri", "cel"),
    Case("output-uri-https", spec(output={"uri": "https://bucket/run"}), "spec.output.uri", "cel"),
    Case("cache-root-gs", spec(storage={"cacheRoot": "gs://bucket/cache"}),
         "spec.storage.cacheRoot", "cel"),
    Case("output-local-dot-dot", spec(output={"uri": "runs/../../etc"}), "spec.output.uri",
         "cel"),
    Case("pvc-dot-dot", spec(model={"uri": "pvc://models/../../secrets"}), "spec.model.uri",
         "cel"),
    Case("s3-without-bucket", spec(model={"uri": "s3:///models"}), "spec.model.uri", "cel"),
    Case("pvc-claim-not-dns", spec(model={"uri": "pvc://Bad_Claim/models"}), "spec.model.uri",
         "cel"),
    Case("uri-with-credentials", spec(model={"uri": "s3://AKIAEXAMPLE:wJalrXUtn@models/base"}),
         "spec.model.uri", "cel"),
    Case("presigned-uri", spec(data={"train": [
        "s3://d/a.jsonl?X-Amz-Credential=AKIA%2F20261201&X-Amz-Signature=0123abcd"]}),
         "spec.data.train[0]", "cel"),
    Case("token-in-query", spec(output={"uri": "s3://runs/x?token=s3cr3t"}), "spec.output.uri",
         "cel"),
    # ---- issue 16.6: credentials where the query rule did not look
    Case("signature-percent-encoded", spec(model={"uri": "s3://m/x?X%2DAmz%2DSignature=abc"}),
         "spec.model.uri", "cel"),
    Case("signature-word-percent-encoded", spec(model={"uri": "s3://m/x?X-Amz-%53ignature=abc"}),
         "spec.model.uri", "cel"),
    Case("signature-in-fragment", spec(model={"uri": "s3://m/x#X-Amz-Signature=abc"}),
         "spec.model.uri", "cel"),
    Case("token-in-path-parameter", spec(data={"train": ["s3://d/a.jsonl;token=abc"]}),
         "spec.data.train[0]", "cel"),
    Case("name-trailing-newline", {"metadata": {"name": "rt-nl\n"}}, "metadata.name", "cel",
         crd_path=""),
    Case("hf-data-not-a-dataset", spec(data={"train": ["hf://org/name"]}), "spec.data.train[0]",
         "cel"),
    Case("hf-for-output", spec(output={"uri": "hf://datasets/org/name"}), "spec.output.uri",
         "cel"),
    # ---- issue 18: sources with their own terms
    Case("train-and-sources", spec(data={"sources": [SOURCE]}), "spec.data.sources", "cel"),
    Case("neither-train-nor-sources", spec(data={"train": DELETE}), "spec.data.sources", "cel"),
    Case("validation-sources-with-validation",
         spec(data={"validation": ["s3://d/v.jsonl"], "validationSources": [VSOURCE]}),
         "spec.data.validationSources", "cel"),
    Case("validation-sources-with-fraction",
         spec(data={"validationFraction": 0.1, "validationSources": [VSOURCE]}),
         "spec.data.validationSources", "cel"),
    Case("source-name-twice", spec(data={"train": DELETE, "sources": [SOURCE, SOURCE]}),
         "spec.data.sources", "cel"),
    Case("source-name-in-both-lists",
         spec(data={"train": DELETE, "sources": [SOURCE], "validationSources": [SOURCE]}),
         "spec.data.sources", "cel"),
    Case("source-name-of-a-plain-validation-entry",
         spec(data={"train": DELETE, "validation": ["s3://d/v.jsonl"],
                    "sources": [{**SOURCE, "name": "validation-0"}]}),
         "spec.data.sources", "cel"),
    Case("hub-fields-without-hub-dataset",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "split": "train"}]}),
         "spec.data.sources", "cel"),
    Case("hub-dataset-not-org-name",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "uri": "hf://datasets/tulu"}]}),
         "spec.data.sources[0].uri", "cel"),
    Case("source-name-not-a-label",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "name": "Policy_Docs"}]}),
         "spec.data.sources[0].name", "schema"),
    Case("source-fraction-zero",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "fraction": 0}]}),
         "spec.data.sources[0].fraction", "schema"),
    Case("source-fraction-above-100",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "fraction": 101}]}),
         "spec.data.sources[0].fraction", "schema"),
    Case("source-max-rows-zero",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "maxRows": 0}]}),
         "spec.data.sources[0].maxRows", "schema"),
    Case("source-rejected-fraction-above-one",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "maxRejectedFraction": 2}]}),
         "spec.data.sources[0].maxRejectedFraction", "schema"),
    Case("source-unknown-term",
         spec(data={"train": DELETE, "sources": [{**SOURCE, "weight": 2}]}),
         "spec.data.sources[0].weight", "schema", crd_path="spec.data.sources[0]"),
    Case("hf-model-not-org-name", spec(model={"uri": "hf://just-a-name"}), "spec.model.uri",
         "cel"),
    Case("s3-endpoint-plain-http", spec(storage={"s3": {"endpoint": "http://minio:9000"}}),
         "spec.storage.s3.endpoint", "cel"),
    Case("s3-endpoint-metadata",
         spec(storage={"s3": {"endpoint": "http://169.254.169.254/latest",
                              "allowInsecureEndpoint": True}}),
         "spec.storage.s3.endpoint", "cel"),
    Case("hf-endpoint-plain-http", spec(storage={"hf": {"endpoint": "http://hub.local"}}),
         "spec.storage.hf.endpoint", "cel"),
    # ---- issue 16.3: metadata addresses in other spellings (trainer side: test_storage_safety)
    *[Case(f"s3-endpoint-{name}",
           spec(storage={"s3": {"endpoint": endpoint, "allowInsecureEndpoint": True}}),
           "spec.storage.s3.endpoint", "cel")
      for name, endpoint in [
          ("decimal", "http://2852039166/"),
          ("hex", "http://0xa9fea9fe/"),
          ("octal", "http://0251.0376.0251.0376/"),
          ("two-parts", "http://169.254.43518/"),
          ("loopback-as-a-number", "http://2130706433:18765"),
          ("trailing-dot", "http://169.254.169.254./"),
          ("ipv4-mapped-dotted", "http://[::ffff:169.254.169.254]/"),
          ("ipv4-mapped-hex", "http://[::ffff:a9fe:a9fe]/"),
          ("ipv4-compatible", "http://[::a9fe:a9fe]/"),
          ("nat64", "http://[64:ff9b::a9fe:a9fe]/"),
          ("aws-ipv6-metadata", "http://[fd00:ec2::254]/"),
          ("aws-ipv6-metadata-zeros", "http://[fd00:ec2:0:0:0:0:0:254]/"),
          ("aws-ipv6-metadata-upper-case", "http://[FD00:EC2::254]/"),
          ("ipv6-link-local", "http://[fe80::a9fe]:9000/"),
          ("alibaba-metadata", "http://100.100.100.200/"),
      ]],
    Case("document-separator-on-chat",
         spec(data={"format": "chat", "documentSeparator": "<|endoftext|>"}),
         "spec.data.documentSeparator", "cel"),
    Case("document-separator-two-lines", spec(data={"documentSeparator": "a\nb"}),
         "spec.data.documentSeparator", "schema"),
    Case("max-perplexity-without-validation", spec(output={"maxPerplexity": 10}),
         "spec.output.maxPerplexity", "cel"),
    Case("max-perplexity-zero", spec(output={"maxPerplexity": 0}), "spec.output.maxPerplexity",
         "schema"),
    # ---- data files: typed lists, so the API server checks each one like the model does
    Case("train-a-bare-string", spec(data={"train": "s3://d/x.jsonl"}), "spec.data.train",
         "schema"),
    Case("train-neither-string-nor-list", spec(data={"train": {"uri": "s3://d/x"}}),
         "spec.data.train", "schema"),
    Case("train-empty", spec(data={"train": []}), "spec.data.train", "schema"),
    Case("train-uri-newline", spec(data={"train": ["s3://d/x\n; rm -rf /"]}),
         "spec.data.train[0]", "schema"),
    Case("train-uri-ftp", spec(data={"train": ["s3://d/a", "ftp://d/b"]}), "spec.data.train[1]",
         "cel"),
    Case("train-uri-twice", spec(data={"train": ["s3://d/a", "s3://d/a"]}), "spec.data.train",
         "schema", crd_path="spec.data.train[1]"),
    Case("validation-uri-control-character", spec(data={"validation": ["s3://d/\x07"]}),
         "spec.data.validation[0]", "schema"),
    # ---- only the operator can refuse these: the CRD cannot express them
    Case("node-selector-key-not-a-label", spec(resources={"nodeSelector": {"bad key!": "x"}}),
         "spec.resources.nodeSelector", "model"),
    Case("node-selector-key-trailing-newline",
         spec(resources={"nodeSelector": {"node-type\n": "gpu"}}),
         "spec.resources.nodeSelector", "model"),
]  # fmt: skip


def problems_of(doc: dict[str, Any]) -> list[api.Problem]:
    with pytest.raises(api.InvalidRun) as refused:
        api.parse_run(doc)
    return refused.value.problems


def test_there_are_enough_cases_and_ids_are_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_spec_is_refused_by_the_model_with_path_and_fix(case: Case) -> None:
    problems = problems_of(case.doc)
    assert [p.path for p in problems] == [case.path], problems
    [problem] = problems
    what, dash, fix = problem.message.partition(" — ")
    assert what and dash and fix.strip(), f"no fix after '—' in {problem.message!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_spec_is_refused_by_the_crd_where_it_can_be(case: Case) -> None:
    doc = case.doc
    where = case.crd_path if case.crd_path is not None else case.path
    errors = kube.schema_errors(doc)
    if case.refused_by == "schema":
        assert where in [e.path for e in errors], errors
        return  # CEL rules of a schema-invalid object are beside the point
    assert errors == [], f"{case.id}: the schema refuses it, but the case says {case.refused_by}"
    failures = kube.rule_failures(doc)
    assert [f for f in failures if f.error] == [], "a rule could not be evaluated"
    if case.refused_by == "cel":
        assert where in [f.path for f in failures], failures
        assert all("—" in f.message for f in failures)
    else:
        assert failures == [], f"{case.id}: a CEL rule refuses it — mark the case 'cel'"


def test_every_cel_rule_refuses_some_invalid_case() -> None:
    """Each rule is shown to fail (the immutability rules in test_crd's transition tests)."""
    hit = {f.rule for c in CASES if c.refused_by == "cel" for f in kube.rule_failures(c.doc)}
    table = {r.rule for r in crd.cel_rules()}
    table |= {r.cel for kind in rules.FIELD_RULES.values() for r in kind}
    table |= {crd.QUANTITY_RULE.rule}
    missed = table - hit - {"self == oldSelf"}
    assert missed == set()


def test_every_rule_of_the_table_is_enforced_by_the_model_too() -> None:
    """The pydantic side runs the same table: each named rule refuses some case."""
    by_message = {f"{r.message} — {r.fix}": r.name for r in rules.RULES}
    by_message |= {f"{r.message} — {r.fix}": r.name for r in rules.RUNG_RULES}
    by_message |= {
        f"{r.message} — {r.fix}": r.name for kind in rules.FIELD_RULES.values() for r in kind
    }
    seen = set()
    for case in CASES:
        try:
            api.parse_run(case.doc)
        except api.InvalidRun as refused:
            for problem in refused.problems:
                seen |= {name for text, name in by_message.items() if text in problem.message}
    assert set(by_message.values()) - seen == set()


def test_field_and_rule_errors_are_reported_in_one_pass() -> None:
    """One field error (a bad type in training) and one rule error elsewhere (merge without an
    adapter): both come back from one parse, as `kubetrain validate` prints them."""
    doc = merge(BASE, spec(training={"microBatchSize": "four"}, output={"merge": True}))
    assert {p.path for p in problems_of(doc)} == {
        "spec.training.microBatchSize",
        "spec.output.merge",
    }
    # a rule that reads the broken section is skipped, not reported on guessed values
    doc = merge(BASE, spec(training={"precision": "fp128"}, resources={"gpusPerNode": 0}))
    assert [p.path for p in problems_of(doc)] == ["spec.training.precision"]


def test_a_rule_that_does_not_read_the_broken_section_still_runs() -> None:
    """Tried as a new user would: an unknown field in training, and a sanity rung wider than the
    run — rung-gpus-within-run reads only sanity and resources, so it is reported too."""
    doc = merge(
        BASE,
        spec(
            training={"learningRat": 1e-4},
            resources={"nodes": 1, "gpusPerNode": 2},
            sanity={"rungs": [{"gpus": 4, "steps": 10}]},
        ),
    )
    assert [(p.path, p.message) for p in problems_of(doc)] == [
        (
            "spec.training.learningRat",
            "unknown field — remove it or check its spelling against `kubectl explain "
            "trainingrun.spec`",
        ),
        (
            "spec.sanity.rungs[0].gpus",
            "a sanity rung asks for more GPUs than the run has (nodes × gpusPerNode) — use at "
            "most that many",
        ),
    ]
    # a rung rule that reads the broken section is skipped (fp16 on a CPU rung reads training)
    doc = merge(
        BASE,
        spec(training={"precision": "fp16", "learningRat": 1e-4}, sanity={"gpus": 0}),
    )
    assert [p.path for p in problems_of(doc)] == ["spec.training.learningRat"]


class _Sections:
    """A parsed spec (or the root's metadata) whose sections outside `declared` cannot be read."""

    def __init__(self, parsed: Any, declared: frozenset[str], names: dict[str, str]) -> None:
        self._parsed, self._declared, self._names = parsed, declared, names

    def __getattr__(self, name: str) -> Any:
        wire = self._names.get(name)
        if wire is not None and wire not in self._declared:
            raise AssertionError(f"reads spec.{wire}, which it does not declare")
        return getattr(self._parsed, name)


def _undeclared_reads(run: api.TrainingRun) -> Iterator[str]:
    """Rules whose check reads a spec section (or metadata) outside `sections()`."""
    names = {name: info.alias or name for name, info in api.TrainingRunSpec.model_fields.items()}

    def guarded(declared: frozenset[str]) -> Any:
        meta = run.metadata if "metadata" in declared else None
        return SimpleNamespace(metadata=meta, spec=_Sections(run.spec, declared, names))

    for rule in rules.RULES:
        node = rules.node_at(guarded(rule.sections()), rule.at)
        try:
            if node is not None:
                rule.check(node)
        except (AssertionError, AttributeError) as error:
            yield f"{rule.name}: {error}"
    for rung_rule in rules.RUNG_RULES:
        spec_ = guarded(rung_rule.sections()).spec
        for _, rung in rules.rung_items(run.spec):
            try:
                rung_rule.check(spec_, rung)
            except AssertionError as error:
                yield f"{rung_rule.name}: {error}"


def test_every_rule_reads_only_the_sections_it_declares() -> None:
    """One pass runs a rule when the sections it declares parsed; a rule that read another one
    would run on a guess. Every rule's check is run with the other sections unreadable."""
    docs = [BASE, SCRATCH, *(yaml.safe_load(p.read_text()) for p in EXAMPLES)]
    ladder = spec(resources={"gpusPerNode": 2}, sanity={"rungs": [{"gpus": 1}, {"gpus": 2}]})
    docs.append(merge(BASE, ladder))
    runs = [api.parse_run(d) for d in docs]
    assert any(run.spec.sanity is not None and run.spec.sanity.rungs for run in runs)
    assert [problem for run in runs for problem in _undeclared_reads(run)] == []
    # the guard bites: a rung rule that declared only `sanity` would be caught reading resources
    narrow = rules.RUNG_RULES[0]
    guard = _Sections(runs[-1].spec, frozenset({"sanity"}), {"resources": "resources"})
    with pytest.raises(AssertionError, match=r"spec\.resources"):
        narrow.check(guard, runs[-1].spec.sanity.rungs[0])


def test_credentials_in_uris_are_refused_without_echoing_them() -> None:
    secret = "wJalrXUtnFEMIK7MDENG"
    for uri in (
        f"s3://AKIAEXAMPLE:{secret}@bucket/model",
        f"s3://bucket/model?X-Amz-Signature={secret}",
        f"s3://bucket/model?X-Amz-Security-Token={secret}",
    ):
        problems = problems_of(merge(BASE, spec(model={"uri": uri})))
        assert [p.path for p in problems] == ["spec.model.uri"]
        assert secret not in str(problems) and "storage.s3.secretName" in problems[0].message
        failures = kube.rule_failures(merge(BASE, spec(model={"uri": uri})))
        assert failures and all(secret not in f.message for f in failures)


def test_accepted_forms_pass_both_sides() -> None:
    for patch in (
        spec(model={"uri": "hf://meta-llama/Llama-3.1-8B"}),
        spec(model={"uri": "hf://meta-llama/Llama-3.1-8B@main"}, tokenizer={"uri": "hf://a/b"}),
        spec(data={"train": ["s3://d/dir/", "s3://d/x/*.jsonl", "data/*.txt"]}),
        spec(storage={"s3": {"endpoint": "http://minio:9000", "allowInsecureEndpoint": True}}),
        spec(storage={"s3": {"endpoint": "https://minio.example:9000"}}),
        spec(storage={"hf": {"secretName": "hf-token", "endpoint": "https://hub.example"}}),
        spec(resources={"cpu": 64, "memory": "512Gi", "preprocess": {"cpu": 8}}),
        spec(sanity={"rungs": [{"gpus": 1, "zeroStage": 0, "optimizer": "paged_adamw_8bit"}]}),
        spec(
            data={
                "documentSeparator": "<|endoftext|>",
                "packing": {"crossDocumentAttention": False},
            }
        ),
        spec(data={"validationFraction": 0.01}, output={"maxPerplexity": 12.5}),
        spec(
            data={
                "train": DELETE,
                "sources": [
                    {**SOURCE, "exclude": ["*/processed/*"], "maxRows": 50000, "optional": True},
                    {
                        "name": "tulu",
                        "uri": "hf://datasets/allenai/tulu-3-sft-mixture@main",
                        "fraction": 0.1,
                        "split": "train",
                        "files": ["data/*.parquet"],
                    },
                    {
                        "name": "twice",
                        "uri": "s3://d/x/*.jsonl",
                        "fraction": 2.5,
                        "maxRejectedFraction": 0.2,
                    },
                ],
                "validationSources": [VSOURCE],
            },
            output={"maxPerplexity": 12.5},
        ),
        spec(data={"validation": ["s3://d/v.jsonl"], "train": DELETE, "sources": [SOURCE]}),
    ):
        doc = merge(BASE, patch)
        api.parse_run(doc)
        assert kube.schema_errors(doc) == [] and kube.rule_failures(doc) == [], patch


def test_every_step_count_is_capped_on_both_sides() -> None:
    """Past int64 a step count crashed the trainer (OverflowError, exit 1, retried forever):
    the model and the CRD refuse it, and the cap itself is accepted."""
    from kubetrain_contract.limits import MAX_STEPS

    fields: dict[str, Any] = {
        "spec.training.maxSteps": lambda n: spec(training={"maxSteps": n}),
        "spec.training.evalSteps": lambda n: spec(training={"maxSteps": 10, "evalSteps": n}),
        "spec.training.loggingSteps": lambda n: spec(training={"maxSteps": 10, "loggingSteps": n}),
        "spec.checkpoints.everySteps": lambda n: spec(checkpoints={"everySteps": n}),
    }
    for path, patch in fields.items():
        refused = merge(BASE, patch(4_000_000_000_000_000_000))
        assert [p.path for p in problems_of(refused)] == [path]
        assert path in [e.path for e in kube.schema_errors(refused)]
        accepted = merge(BASE, patch(MAX_STEPS))
        api.parse_run(accepted)
        assert kube.schema_errors(accepted) == [], path


def test_the_bases_are_valid_everywhere() -> None:
    for doc in (BASE, SCRATCH):
        api.parse_run(doc)
        assert kube.schema_errors(doc) == []
        assert kube.rule_failures(doc) == []


def test_cross_field_problems_are_reported_together() -> None:
    doc = merge(
        BASE,
        spec(
            output={"merge": True},
            training={"precision": "fp16"},
            resources={"gpusPerNode": 0},
            method={"stage": "pretrain", "adapter": {"type": "none"}},
            data={"format": "chat"},
        ),
    )
    assert {p.path for p in problems_of(doc)} == {
        "spec.output.merge",
        "spec.training.precision",
        "spec.data.format",
    }
    assert {f.path for f in kube.rule_failures(doc)} == {
        "spec.output.merge",
        "spec.training.precision",
        "spec.data.format",
    }


# ------------------------------------------------------------------------------------ valid specs


def test_minimal_spec_gets_the_documented_defaults() -> None:
    run = api.parse_run(BASE).spec
    assert run.tokenizer.uri is None and run.tokenizer.train is None
    assert run.data.block_size == 1024 and run.data.validation_fraction == 0.0
    assert run.data.text_field == "text" and run.data.max_rejected_fraction == 0.01
    assert run.method.adapter.type == "none" and run.method.dpo is None
    assert run.training.epochs is None and run.training.max_steps is None
    assert (run.training.optimizer, run.training.precision) == ("adamw_torch", "bf16")
    assert (run.training.micro_batch_size, run.training.gradient_accumulation_steps) == (1, 1)
    assert (run.checkpoints.every_steps, run.checkpoints.keep) == (500, 3)
    assert (run.resources.nodes, run.resources.gpus_per_node) == (1, 1)
    assert run.resources.gpu_resource == "nvidia.com/gpu"
    assert (run.distributed.zero_stage, run.distributed.offload) == (0, "none")
    assert run.sanity is None and run.output.merge is False
    assert (run.max_restarts, run.stall_timeout, run.suspend) == (3, "15m", False)
    scratch = api.parse_run(SCRATCH).spec
    assert scratch.tokenizer.train is not None
    assert scratch.tokenizer.train.special_tokens == ["<|endoftext|>"]
    assert scratch.model.architecture is not None
    assert scratch.model.architecture.family == "llama"


def test_data_uris_stay_as_written() -> None:
    files = ["s3://datasets/a.jsonl", "pvc://data/b.parquet", "local/c.txt", "s3://d/p/"]
    doc = merge(BASE, spec(data={"train": files, "validation": ["s3://d/val/*.jsonl"]}))
    parsed = api.parse_run(doc).spec.data
    assert (parsed.train, parsed.validation) == (files, ["s3://d/val/*.jsonl"])


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_round_trips_through_the_model(path: Path) -> None:
    """parse → dump (camelCase, as the operator writes it) → parse gives the same run, and the dump
    is a valid custom resource for the CRD."""
    run = api.parse_run(yaml.safe_load(path.read_text()))
    dumped = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert api.parse_run(dumped) == run
    assert kube.schema_errors(dumped) == []
    assert kube.rule_failures(dumped) == []


def test_docs_list_every_rule_of_the_table() -> None:
    """docs/api.md says where each rule is enforced; a rule added to the table must be listed."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    names = [r.name for r in (*rules.RULES, *rules.RUNG_RULES)]
    names += [r.name for kind in rules.FIELD_RULES.values() for r in kind]
    assert [n for n in names if f"`{n}`" not in text] == []
