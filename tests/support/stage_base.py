"""Complete stage configs for tests and benches, written by the operator's real `plan_run`.

The trainer requires every field the plan writes, so the API's defaults are the only defaults.
Tests start from what the plan writes for two small runs (a tiny pretraining run on CPU with a
trained tokenizer and a sanity rung; a DPO run, for the `dpo` block only it carries) and override
the fields they exercise with :func:`changed`. A value a test does not set is therefore exactly
what a rendered run would carry. Paths in the base runs are placeholders: the helpers in
trainer_support.py and preprocess_support.py always set the data, output and cache paths.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from kubetrain_operator.api import parse_run
from kubetrain_operator.plan import plan_run

#: Placeholder root of the base runs' paths; a test that forgets to set a path fails on it.
PLACEHOLDER = "/kubetrain-test-placeholder"
#: The tiny Llama every trainer test builds (pretraining from scratch).
TINY = {
    "hiddenSize": 64,
    "layers": 2,
    "heads": 4,
    "kvHeads": 2,
    "intermediateSize": 128,
    "contextLength": 128,
}
_PRETRAIN = {
    "apiVersion": "kubetrain.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "t"},
    "spec": {
        "model": {"architecture": TINY},
        "tokenizer": {"train": {"vocabSize": 1024, "specialTokens": ["<|endoftext|>"]}},
        "data": {"format": "text", "train": [f"{PLACEHOLDER}/data.txt"], "blockSize": 64},
        "method": {"stage": "pretrain"},
        "training": {"maxSteps": 20},
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "sanity": {"steps": 20, "gpus": 0},
        "output": {"uri": f"{PLACEHOLDER}/output"},
    },
}
_DPO = {
    **_PRETRAIN,
    "spec": {
        "model": {"uri": f"{PLACEHOLDER}/policy"},
        "data": {"format": "preference", "train": [f"{PLACEHOLDER}/pairs.jsonl"]},
        "method": {"stage": "dpo"},
        "training": {"maxSteps": 20},
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "output": {"uri": f"{PLACEHOLDER}/output"},
    },
}
#: Blocks that are "exactly one of" a few sources: naming one in a change clears the others.
_ONE_OF = {"model": ("uri", "architecture"), "tokenizer": ("uri", "train")}


@functools.cache
def _plans() -> tuple[dict[str, dict[str, Any]], ...]:
    """Stage name → config, for the pretraining run and the DPO run (no metrics server)."""
    return tuple(
        {s.name: s.config for s in plan_run(parse_run(doc), target="local", metrics_port=0).stages}
        for doc in (_PRETRAIN, _DPO)
    )


def base_config(stage: str) -> dict[str, Any]:
    """The pretraining run's config of `stage` (preprocess, sanity, train or merge), a copy."""
    return copy.deepcopy(_plans()[0]["sanity-1" if stage == "sanity" else stage])


def _complete(path: tuple[str, ...]) -> dict[str, Any]:
    """The first non-null block at `path` in any planned config: the API's defaults for a block
    a base leaves null (dpo, sanity, model.architecture, tokenizer.train)."""
    for plan in _plans():
        for config in plan.values():
            node: Any = config
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict):
                return copy.deepcopy(node)
    return {}


def changed(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stage config with `changes` merged into it (mappings are merged key by key).

    A mapping set where the config has null is merged into the API's defaults of that block, and
    naming one source of a one-of block (model, tokenizer) clears the others."""
    return _merge(config, changes, ())


def _merge(base: dict[str, Any], changes: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        here = (*path, key)
        if isinstance(value, dict) and key != "deepspeed":  # DeepSpeed's config is one value
            current = out.get(key)
            start: dict[str, Any] = current if isinstance(current, dict) else _complete(here)
            sources = _ONE_OF.get(key, ())
            if any(s in value for s in sources):
                start = {**start, **{s: None for s in sources}}
            out[key] = _merge(start, value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def train_block(dotted: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """One block of the planned train config (`model.architecture`, `adapter`) with `changes`:
    for tests that validate one part of a config (Architecture, AdapterConfig) alone."""
    node: dict[str, Any] = base_config("train")
    for key in dotted.split("."):
        node = node[key]
    return changed(node, changes or {})


def source(name: str, uri: str, split: str = "train", **terms: Any) -> dict[str, Any]:
    """A SourceConfig as the plan writes it (a plain data.train entry's), with `terms` set."""
    planned = base_config("preprocess")["sources"][0]
    return {**planned, "name": name, "split": split, "uri": uri, **terms}


def plain_sources(train: list[str], validation: list[str] | None = None) -> list[dict[str, Any]]:
    """The sources the plan writes for data.train and data.validation lists."""
    return [source(f"train-{i}", uri) for i, uri in enumerate(train)] + [
        source(f"validation-{i}", uri, "validation") for i, uri in enumerate(validation or [])
    ]
