"""Does the model fit the GPU? The trainer's side of the memory model (docs/trainer.md, "The
device check"; docs/preprocessing.md, "The fit check").

Two checks, both before a single weight is loaded, with the numbers of
`kubetrain_contract.memory` (the one memory model; nothing here re-derives it):

* the device check of the train, sanity and merge stages: the stage's planned `memory.Setup`
  against the real device's total memory (`check_device`); over it is exit 2 with the same
  message the operator gives. On CPU nothing is checked, the estimate is still kept;
* the preprocess stage's fit check (`check_request`), when the plan could not size the model:
  every stage's setup against the run's declared GPU memory, from the model's `config.json`
  alone (`read_model_config`: a local or pvc directory, one S3 object, or `hf://` fetching that
  one file) or, for a model built from an architecture, the tokenizer's size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kubetrain_contract import memory
from kubetrain_trainer import storage
from kubetrain_trainer.config import FitRequest, S3Settings
from kubetrain_trainer.stage import InvalidInput, failure

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
#: A transformers config.json is a few KiB (large multimodal ones under 100 KiB): anything far
#: larger is not one, and is refused unread rather than held in memory.
CONFIG_LIMIT = 1 << 20


def parse_config(text: bytes, source: str, what: str) -> memory.ModelShape:
    """The shape a config.json describes; exit 2 naming the file when it is not one."""
    try:
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(
            f"{what}: {source} is not JSON ({error}) — point {what} at a directory written by "
            "save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise InvalidInput(f"{what}: {source} is not a JSON object — it is not a model config")
    try:
        return memory.ModelShape.from_hf_config(config, source)
    except memory.ShapeError as error:
        raise InvalidInput(f"{what}: {error}") from None


def shape_of_dir(model_dir: Path, what: str) -> memory.ModelShape | None:
    """The shape from a fetched model directory's config.json; None (with a warning) when the
    memory model cannot count it — a model transformers trains is not refused for that."""
    path = model_dir / CONFIG_FILE
    try:
        return parse_config(path.read_bytes(), str(path), what)
    except OSError as error:
        log.warning("no memory estimate: cannot read %s: %s", path, error.strerror)
    except InvalidInput as error:
        log.warning("no memory estimate: %s", error.message)
    return None


def _read_limited(uri: str, s3: S3Settings, what: str) -> bytes:
    """One file or object, refused unread above CONFIG_LIMIT (the stream is read no further)."""
    found = storage.head(uri, s3)
    if found.size > CONFIG_LIMIT:
        raise InvalidInput(
            f"{what}: {uri} is {found.size} bytes, larger than any model config "
            f"({CONFIG_LIMIT} at most) — point {what} at a directory written by save_pretrained"
        )
    with storage.open_binary(uri, s3) as stream:
        return stream.read(CONFIG_LIMIT + 1)


def read_model_config(uri: str, s3: S3Settings, workdir: Path, what: str) -> bytes:
    """Only the `config.json` of the model at `uri`: local and pvc paths with the hostile-input
    checks of every input (a regular file inside the model's directory, no symlink out of it),
    one S3 object, or that one file of an `hf://` repository. Size-limited everywhere."""
    try:
        if storage.is_hf(uri):
            from kubetrain_trainer.storage import hub

            dest = workdir / "model-config"
            hub.download(uri, dest, patterns=[CONFIG_FILE])
            path = dest / CONFIG_FILE
            if not path.is_file():
                raise storage.NotFound(f"{uri}: the repository has no {CONFIG_FILE}")
            storage.check_local_input(str(path), dest)
            return _read_limited(str(path), s3, what)
        config_uri = storage.join(uri, CONFIG_FILE)
        if not storage.is_s3(uri):
            storage.check_local_input(config_uri, storage.local_path(uri))
        return _read_limited(config_uri, s3, what)
    except storage.NotFound as error:
        raise InvalidInput(
            f"{what}: {error.message} — point {what} at a directory written by save_pretrained "
            "(it holds config.json)"
        ) from None
    except storage.StorageError as error:  # refused or denied: 2; transient: 1
        raise failure(error.exit_code, f"{what}: {error.message}", error.details) from None


def check_request(
    request: FitRequest, s3: S3Settings, workdir: Path, tokenizer_size: int | None
) -> list[dict[str, Any]]:
    """The preprocess stage's fit table; exit 2 listing every GPU stage over the GPU's memory.
    `tokenizer_size` sizes a model built from an architecture (None with a model URI)."""
    if request.model_uri is not None:
        text = read_model_config(request.model_uri, s3, workdir, "model.uri")
        shape = parse_config(text, storage.join(request.model_uri, CONFIG_FILE), "model.uri")
    else:
        assert request.architecture is not None and tokenizer_size is not None
        shape = memory.ModelShape.from_architecture(
            request.architecture.model_dump(by_alias=True), tokenizer_size
        )
    capacity, rows, refusals = request.gpu_memory_bytes, [], []
    for setup in (memory.Setup.from_dict(s) for s in request.setups):
        estimate = memory.estimate(shape, setup)
        rows.append(memory.row(estimate, capacity))
        if setup.gpu and estimate.total > capacity:
            refusal = memory.refusal(estimate, shape, capacity, request.gpu_memory_source)
            refusals.append(f"{setup.where}: {refusal}")
    if refusals:
        raise InvalidInput("\n".join(refusals), {"fit": rows})
    log.info("fit: every stage fits %s (%s)", memory.gib(capacity), request.gpu_memory_source)
    return rows


def check_device(
    setup: memory.Setup, shape: memory.ModelShape | None, device_index: int
) -> memory.Estimate | None:
    """The estimate of this process (None: the model cannot be counted), refused with exit 2
    when it exceeds the total memory of CUDA device `device_index`. On CPU: only estimated."""
    if shape is None:
        return None
    import torch  # here, not at the top: the preprocess stage imports this module, never torch

    estimate = memory.estimate(shape, setup)
    if not torch.cuda.is_available():
        return estimate
    device = torch.cuda.get_device_properties(device_index)
    capacity = int(device.total_memory)
    if estimate.total > capacity:
        refusal = memory.refusal(estimate, shape, capacity, f"the device: {device.name}")
        raise InvalidInput(f"{setup.where}: {refusal}")
    log.info(
        "memory: about %s of %s on %s",
        memory.gib(estimate.total),
        memory.gib(capacity),
        device.name,
    )
    return estimate
