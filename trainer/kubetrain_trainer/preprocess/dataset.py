"""The packed dataset format (`dataset-v1`, docs/dataset-format.md): layout, cache key, reading.

The writer (`preprocess`) and every reader (the trainer's `data`, merge/evaluate) share this module:

    from kubetrain_trainer.preprocess.dataset import read_pointer, verify_dataset, open_split
    pointer = read_pointer(config.dataset_pointer, config.s3)
    path, manifest = verify_dataset(pointer["uri"], config.s3)   # _SUCCESS + every shard's sha256
    table = open_split(path, manifest, "train")                   # memory-mapped, zero-copy

It imports only pyarrow and the storage layer, so readers do not pay for tokenizers or transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from kubetrain_trainer import storage
from kubetrain_trainer.config import PreprocessConfig, S3Settings
from kubetrain_trainer.stage import InvalidInput

log = logging.getLogger(__name__)

FORMAT_VERSION = "dataset-v1"
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
TOKENIZER_DIR = "tokenizer"
#: User metadata key of a shard object on S3: its sha256, set at upload, compared on a cache hit.
SHA256_METADATA = "sha256"
SPLITS = ("train", "validation")
#: Best-fit packing keeps this many blocks open; part of the cache key (it changes the output).
OPEN_BINS = 256

_TOKENS = pa.list_(pa.int32())
SCHEMAS = {
    "text": pa.schema([("input_ids", _TOKENS), ("labels", _TOKENS)]),
    "chat": pa.schema([("input_ids", _TOKENS), ("labels", _TOKENS), ("position_ids", _TOKENS)]),
    "preference": pa.schema(
        [("prompt_ids", _TOKENS), ("chosen_ids", _TOKENS), ("rejected_ids", _TOKENS)]
    ),
}
PACKING = {"text": "concatenate", "chat": f"best-fit-{OPEN_BINS}", "preference": "none"}
#: Text packing with position_ids restarting per document (crossDocumentAttention: false).
TEXT_PER_DOCUMENT = "concatenate-position-ids"


class DatasetError(InvalidInput):
    """A dataset that must not be trained on (incomplete, corrupt, other format): exit 2."""


def packing(config: PreprocessConfig) -> str:
    """How rows are packed (recorded in the manifest and the cache key)."""
    if config.format == "text" and not config.cross_document_attention:
        return TEXT_PER_DOCUMENT
    return PACKING[config.format]


def schema(fmt: str, packing: str) -> pa.Schema:
    """The columns of a dataset: text packed per document carries position_ids, like chat."""
    return SCHEMAS["chat"] if packing == TEXT_PER_DOCUMENT else SCHEMAS[fmt]


def identity(
    config: PreprocessConfig,
    inputs: list[dict[str, str]],
    tokenizer_fingerprint: str,
    template: str | None,
) -> dict[str, Any]:
    """Everything that determines the dataset's bytes, and nothing else (docs/dataset-format.md).

    `inputs` are {"split", "kind", "fingerprint"} in input order: the content, not the path.
    Settings that cannot change the output for this config are left out, so that changing them
    does not invalidate the cache: the field names of other formats, textSplit without .txt
    inputs, partialBlock outside text, the seed without validationFraction.
    """
    fields = config.fields
    names = {
        "text": {"text": fields.text},
        "chat": {"messages": fields.messages},
        "preference": {
            "prompt": fields.prompt,
            "chosen": fields.chosen,
            "rejected": fields.rejected,
        },
    }[config.format]
    key: dict[str, Any] = {
        "formatVersion": FORMAT_VERSION,
        "format": config.format,
        "inputs": inputs,
        "tokenizer": tokenizer_fingerprint,
        "chatTemplate": template,
        "fields": names,
        "blockSize": config.block_size,
        "packing": packing(config),
    }
    if any(i["kind"] == "txt" for i in inputs):
        if config.document_separator is not None:
            key["documentSeparator"] = config.document_separator
        else:
            key["textSplit"] = config.text_split
    if config.format == "text":
        key["partialBlock"] = config.partial_block
    if config.validation_fraction > 0 and not config.split_sources("validation"):
        key["validationFraction"] = config.validation_fraction
        key["seed"] = config.seed
    return key


def cache_key(identity: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of the identity."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_complete(uri: str, s3: S3Settings | None = None) -> bool:
    """Published: `_SUCCESS` is written last, so its presence means every file is there."""
    return storage.exists(storage.join(uri, SUCCESS), s3)


def load_manifest(uri: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """The manifest of a complete dataset; DatasetError if it is incomplete or of another format."""
    if not is_complete(uri, s3):
        raise DatasetError(
            f"{uri}: no {SUCCESS} — the dataset was never published completely; rerun the "
            "preprocess stage (it rebuilds it)"
        )
    try:
        manifest: dict[str, Any] = json.loads(storage.read_text(storage.join(uri, MANIFEST), s3))
    except (storage.NotFound, json.JSONDecodeError) as error:
        raise DatasetError(f"{uri}/{MANIFEST}: unreadable ({error}); rerun preprocess") from None
    if manifest.get("formatVersion") != FORMAT_VERSION:
        raise DatasetError(
            f"{uri}: formatVersion {manifest.get('formatVersion')!r}, this trainer reads "
            f"{FORMAT_VERSION!r} — rerun preprocess with this image"
        )
    _refuse_escapes(uri, manifest)
    return manifest


_KEY = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.arrow$")


def _refuse_escapes(uri: str, manifest: dict[str, Any]) -> None:
    """The key and shard names become local paths: a sha256, and plain file names, nothing else."""
    bad = [str(manifest.get("key"))] if not _KEY.match(str(manifest.get("key", ""))) else []
    bad += [
        str(s.get("file")) for s in shard_files(manifest) if not _SHARD.match(str(s.get("file")))
    ]
    if bad:
        raise DatasetError(
            f"{uri}/{MANIFEST}: {bad[0]!r} is not a dataset key or shard file name (a path there "
            "could lead outside the dataset) — the manifest was not written by kubetrain; rerun "
            "the preprocess stage"
        )


#: How a user reruns the stage that repairs a damaged dataset (named in DatasetError messages).
RERUN = "kubetrain run RUN.yaml --stage preprocess"


def shard_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for split in manifest["splits"].values() for s in split["shards"]]


def damaged_shards(path: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Shards of a local copy that differ from the manifest: {file: what is wrong}."""
    damaged = {}
    for shard in shard_files(manifest):
        file = path / shard["file"]
        if not file.is_file():
            damaged[shard["file"]] = "missing"
        elif file.stat().st_size != shard["bytes"]:
            damaged[shard["file"]] = _size_problem(file.stat().st_size, shard["bytes"])
        elif storage.sha256_file(file) != shard["sha256"]:
            damaged[shard["file"]] = "sha256 does not match the manifest"
    return damaged


def _size_problem(found: int, expected: int) -> str:
    return f"size {found} does not match the manifest's {expected} bytes"


def _listing(damaged: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in damaged.items())


def verify_local(path: Path, manifest: dict[str, Any]) -> None:
    """Check every shard's size and sha256 against the manifest (DatasetError naming the shard)."""
    damaged = damaged_shards(path, manifest)
    if damaged:
        raise DatasetError(
            f"{path}: the dataset is damaged ({_listing(damaged)}); rerun the preprocess stage "
            f"(e.g. `{RERUN}`): on a cache hit it checks every shard and rebuilds a damaged "
            "dataset"
        )


def damaged_objects(
    uri: str, manifest: dict[str, Any], s3: S3Settings | None = None
) -> dict[str, str]:
    """Shard objects under an S3 prefix that differ from the manifest: {file: what is wrong}.

    One HEAD per shard: its size, and the sha256 the writer stored as the object's user metadata
    (`x-amz-meta-sha256`, see `writer.publish`). An object without that metadata — replaced by
    another tool, or published before it existed — is hashed by streaming it (one full read).
    """
    damaged = {}
    for shard in shard_files(manifest):
        object_uri = storage.join(uri, shard["file"])
        try:
            info = storage.head(object_uri, s3)
        except storage.NotFound:
            damaged[shard["file"]] = "missing"
            continue
        if info.size != shard["bytes"]:
            damaged[shard["file"]] = _size_problem(info.size, shard["bytes"])
            continue
        digest = info.metadata.get(SHA256_METADATA)
        if digest is None:
            log.info("%s: no sha256 metadata; hashing the object to check it", object_uri)
            digest = storage.sha256_uri(object_uri, s3)
        if digest != shard["sha256"]:
            damaged[shard["file"]] = "sha256 does not match the manifest"
    return damaged


def verify_dataset(
    uri: str, s3: S3Settings | None = None, cache_dir: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """A verified local copy of a dataset: (directory, manifest).

    Local datasets are checked in place; S3 datasets are fetched once into
    `cache_dir/<key>` (default: the temp dir) and checked there. A damaged file of that local
    copy is fetched again once; if the object itself is damaged, the error names it on S3.
    """
    manifest = load_manifest(uri, s3)
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        verify_local(path, manifest)
        return path, manifest
    root = cache_dir or Path(tempfile.gettempdir()) / "kubetrain-datasets"
    path = storage.download_dir(uri, root / manifest["key"], s3)
    damaged = damaged_shards(path, manifest)
    if damaged:
        log.warning("%s: local copy damaged (%s); fetching it again", path, _listing(damaged))
        for name in damaged:
            (path / name).unlink(missing_ok=True)
        storage.download_dir(uri, path, s3)
        damaged = damaged_shards(path, manifest)
    if damaged:
        for name in damaged:  # never keep a bad copy: the next attempt fetches it again
            (path / name).unlink(missing_ok=True)
        raise DatasetError(
            f"{uri}: the dataset on S3 is damaged — "
            + "; ".join(f"{storage.join(uri, n)}: {why}" for n, why in damaged.items())
            + f". Rerun the preprocess stage of this run (e.g. `{RERUN}`): on a cache hit it "
            "checks every shard object, and rebuilds and republishes a damaged dataset under the "
            "same prefix; then rerun this stage."
        )
    return path, manifest


def open_split(path: Path, manifest: dict[str, Any], split: str = "train") -> pa.Table:
    """All shards of a split as one memory-mapped table (no copy into RAM)."""
    columns = schema(manifest["format"], manifest.get("packing", ""))
    tables = [
        pa.ipc.open_file(pa.memory_map(str(path / shard["file"]))).read_all()
        for shard in manifest["splits"].get(split, {"shards": []})["shards"]
    ]
    return pa.concat_tables(tables) if tables else columns.empty_table()


def read_pointer(uri: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """The {key, uri, cacheHit} the preprocess stage leaves for the later stages."""
    try:
        pointer: dict[str, Any] = json.loads(storage.read_text(uri, s3))
    except storage.NotFound:
        raise DatasetError(
            f"{uri}: no dataset pointer — the preprocess stage has not finished for this run"
        ) from None
    return pointer
