"""What the operator tests share: TrainingRun documents as a user writes them and as the API
server returns them, and the stages' termination messages (the stage contract's result JSON).

What the controllers write (child status, pods) comes from the stand-in's one emulation of
them, standin/controllers.py.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

NAMESPACE = "ml"


def run_doc(name: str = "sft", **spec_changes: Any) -> dict[str, Any]:
    """A small valid fine-tune on S3 (CPU, no sanity gate), with top-level spec keys replaced."""
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/base"},
        "data": {"format": "text", "train": ["s3://data/train.jsonl"], "blockSize": 128},
        "method": {"stage": "sft", "adapter": {"type": "lora"}},
        "training": {"maxSteps": 100, "precision": "fp32"},
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "output": {"uri": f"s3://out/{name}", "merge": True},
        "storage": {"s3": {"secretName": "s3-credentials"}},
        "maxRestarts": 2,
        "stallTimeout": "1m",
    }
    spec.update(copy.deepcopy(spec_changes))
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def stored(doc: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    """The document as the API server returns it (uid, generation)."""
    out = copy.deepcopy(doc)
    out["metadata"].setdefault("uid", str(uuid.uuid4()))
    out["metadata"]["generation"] = generation
    return out


def result(stage: str, ok: bool = True, **fields: Any) -> str:
    """A stage's termination message (the stage contract's result JSON)."""
    return json.dumps({"stage": stage, "ok": ok, **fields}, sort_keys=True)


PREPROCESS_RESULT = {
    "key": "ab" * 32,
    "uri": "s3://out/cache/datasets/abab",
    "cacheHit": False,
    "trainTokens": 21140992,
    "validationTokens": 5283840,
    "rejected": {"emptyText": 12},
    "rowsRead": 1000,
    "accepted": 988,
}
