"""The preprocess stage from start to finish: key → cache hit, or build → publish → pointer."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kubetrain_contract import metrics as series
from kubetrain_contract.exit_codes import EXIT_TERMINATED
from kubetrain_trainer import fit, lifetime, storage
from kubetrain_trainer.config import PreprocessConfig
from kubetrain_trainer.metrics import PreprocessMetrics, serve
from kubetrain_trainer.preprocess import (
    dataset,
    mixture,
    pack,
    parallel,
    readers,
    tokenizer,
    writer,
)
from kubetrain_trainer.preprocess.encode import (
    ChunkEncoder,
    ChunkTexts,
    Columns,
    EncodedChunk,
    EncodeSettings,
)
from kubetrain_trainer.preprocess.rows import Tally
from kubetrain_trainer.stage import InvalidInput, Retryable, failure

log = logging.getLogger("kubetrain_trainer.preprocess")

PROGRESS_SECONDS = 15.0
#: First offending locations per reason in the result JSON and the exit-2 message; the manifest
#: keeps rows.FIRST_PER_REASON (10).
RESULT_FIRST = 3
#: Bytes of JSON the stage hands to `stage.write_result`: the 4 KiB termination message less room
#: for the `stage`/`ok`/`exitCode` fields added around it. Fewer locations per reason are kept
#: (3, 2, 1, then none) until the result fits; the counts are always there.
RESULT_BUDGET = 3584

T = TypeVar("T")


@dataclass(frozen=True)
class Located:
    """Where this config's dataset lives, and what its key was computed from."""

    key: str
    uri: str
    inputs: list[readers.Input]
    plan: tokenizer.TokenizerPlan
    sources: list[readers.Listed]


def locate(config: PreprocessConfig, workdir: Path) -> Located:
    """List every source's files, fingerprint them and the tokenizer, and derive the content key
    (no row is read; a Hub dataset's selected files are fetched at its resolved commit)."""
    if config.split_sources("validation") and config.validation_fraction > 0:
        raise InvalidInput(
            "validationFraction: set together with validation sources — keep one of them"
        )
    listed = readers.sources(config, workdir)
    inputs = [_describe(src, config) for item in listed for src in item.files]
    plan = tokenizer.plan(config, workdir / ".kubetrain-cache" / "tokenizers")
    described = [
        {
            "source": i.source.name,
            "split": i.source.split,
            "kind": i.source.kind,
            "fingerprint": i.identity.fingerprint,
        }
        for i in inputs
    ]
    # Every term of every source, and a Hub dataset's commit; not the URI: the content of the
    # files it names is keyed (a moved copy of the same files is the same dataset).
    terms = [
        {
            **item.config.model_dump(mode="json", by_alias=True, exclude={"uri"}),
            "commit": item.commit,
        }
        for item in listed
    ]
    identity = dataset.identity(config, described, plan.fingerprint, plan.template)
    key = dataset.cache_key({**identity, "sources": terms})
    return Located(key, storage.join(config.cache_root, "datasets", key), inputs, plan, listed)


def run(
    config: PreprocessConfig, workdir: Path, metrics: PreprocessMetrics | None = None
) -> dict[str, Any]:
    """Publish the dataset of this config (or find it published) and point the run at it."""
    started = time.monotonic()
    metrics = metrics or PreprocessMetrics(config.run)
    output = config.dataset_pointer.rpartition("/")[0] or "."
    with lifetime.OutputLock(output, "preprocess"), _terminate_on_sigterm():
        metrics.beat()
        serve(metrics.registry, config.metrics_port)
        fit_rows = check_fit(config, workdir, None)
        where = locate(config, workdir)
        fit_rows = fit_rows or check_fit(config, workdir, where)
        metrics.input_bytes.labels(config.run).set(sum(i.identity.size for i in where.inputs))
        manifest = _cached(where.uri, config)
        hit = manifest is not None
        if not storage.is_s3(where.uri):
            writer.remove_abandoned(storage.local_path(where.uri).parent)
        if manifest is not None:
            log.info("cache hit: %s is complete; reusing it (nothing to compute)", where.uri)
            metrics.cache_hits.labels(config.run).inc()
            _check_sources(manifest["sources"], manifest["counts"], config)
        else:
            log.info("cache miss: building %s", where.uri)
            manifest = build(config, workdir, where, metrics)
        pointer = {"key": where.key, "uri": where.uri, "cacheHit": hit}
        storage.write_text(
            config.dataset_pointer, json.dumps(pointer, sort_keys=True) + "\n", config.s3
        )
    result = _result(manifest, pointer, time.monotonic() - started)
    return result if fit_rows is None else {**result, "fit": fit_rows}


def check_fit(
    config: PreprocessConfig, workdir: Path, where: Located | None
) -> list[dict[str, Any]] | None:
    """The fit table the plan could not make (config.fit), before any row is tokenized: exit 2
    when a GPU stage cannot fit, so that the run never asks for a GPU (fit.check_request). A
    model's config.json is checked before the inputs are even listed (`where` None: no Hub
    dataset is fetched for a run that cannot fit); a model built here needs the tokenizer's size,
    known once `locate` has planned the tokenizer."""
    if config.fit is None or (config.fit.architecture is None) != (where is None):
        return None
    size = tokenizer.size(where.plan) if where is not None else None
    return fit.check_request(config.fit, config.s3, workdir, size)


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM (pod deletion) unwinds: workers stop, staging is removed, exit 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _describe(src: readers.Source, config: PreprocessConfig) -> readers.Input:
    try:
        return readers.Input(src, storage.identify(src.uri, config.s3))
    except storage.StorageError as error:  # missing or unreadable: 2; transient: 1
        raise failure(error.exit_code, f"sources[{src.name}]: {error.message}") from None


def _cached(uri: str, config: PreprocessConfig) -> dict[str, Any] | None:
    """The manifest of a complete, intact dataset under the key; a damaged one is discarded.

    Every shard is checked against the manifest: locally by size and sha256; on S3 by one HEAD
    per shard (size, and the sha256 stored as object metadata at upload; an object without it is
    hashed by streaming). A damaged dataset is discarded, rebuilt and republished (`cacheHit`
    false), so a rerun repairs what the trainer refused.
    """
    if not dataset.is_complete(uri, config.s3):
        return None
    try:
        manifest = dataset.load_manifest(uri, config.s3)
        if storage.is_s3(uri):
            damaged = dataset.damaged_objects(uri, manifest, config.s3)
        else:
            damaged = dataset.damaged_shards(storage.local_path(uri), manifest)
    except dataset.DatasetError as error:
        damaged = {dataset.MANIFEST: error.message}
    if not damaged:
        return manifest
    log.warning(
        "%s is damaged (%s) — discarding it and building it again",
        uri,
        "; ".join(f"{name}: {why}" for name, why in damaged.items()),
    )
    writer.discard(uri, config.s3)
    return None


def _metered(
    chunks: Iterable[readers.Chunk], metrics: PreprocessMetrics
) -> Iterator[readers.Chunk]:
    read_bytes = metrics.read_bytes.labels(metrics.run)
    for chunk in chunks:
        metrics.beat()
        read_bytes.inc(chunk.nbytes)
        yield chunk


def _beating(items: Iterable[T], metrics: PreprocessMetrics) -> Iterator[T]:
    """Each item that arrives (a chunk read here, in the parent, or a worker's result) is
    progress: a hung read or a stuck worker stops the heartbeat."""
    for item in items:
        metrics.beat()
        yield item


def _columns(config: PreprocessConfig) -> list[str]:
    fields = config.fields
    return {
        "text": [fields.text],
        "chat": [fields.messages],
        "preference": [fields.prompt, fields.chosen, fields.rejected],
    }[config.format]


def _train_tokenizer(
    config: PreprocessConfig,
    inputs: list[readers.Input],
    plan: tokenizer.TokenizerPlan,
    pool: parallel.Pool,
    metrics: PreprocessMetrics,
) -> Any:
    """BPE from a stream of the training rows' texts; validation inputs are not learnt from."""
    log.info(
        "training a byte-level BPE tokenizer (vocabulary %d) on the training inputs",
        plan.vocab_size,
    )
    train_inputs = [i for i in inputs if i.source.split == "train"]
    chunks = readers.read_chunks(
        train_inputs, config.text_split, _columns(config), config.s3, config.document_separator
    )
    texts = pool.map(ChunkTexts, (config.format, config.fields), _beating(chunks, metrics))
    return tokenizer.train(_beating(texts, metrics), plan)


class _Progress:
    """Totals, metrics and a log line every PROGRESS_SECONDS."""

    def __init__(self, metrics: PreprocessMetrics, packers: dict[str, pack.Packer]) -> None:
        self.metrics, self.packers = metrics, packers
        self.tally = Tally()
        self.started = self.last = time.monotonic()
        self.tokens = self.blocks = 0

    def add(self, encoded: EncodedChunk) -> None:
        self.metrics.beat()
        self.tally.merge(encoded.tally)
        run, rows = self.metrics.run, self.metrics.rows
        rows.labels(run, "accepted", "").inc(encoded.tally.accepted)
        for reason, count in encoded.tally.rejected.items():
            rows.labels(run, "rejected", reason).inc(count)
        self.update()

    def update(self) -> None:
        tokens = sum(p.stats.tokens for p in self.packers.values())
        blocks = sum(p.stats.rows for p in self.packers.values())
        self.metrics.tokens.labels(self.metrics.run).inc(tokens - self.tokens)
        self.metrics.blocks.labels(self.metrics.run).inc(blocks - self.blocks)
        self.tokens, self.blocks = tokens, blocks
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            log.info(
                "%d rows read (%d rejected), %d tokens in %d blocks, %.0f tokens/s",
                self.tally.rows,
                self.tally.rejected_total,
                tokens,
                blocks,
                tokens / max(now - self.started, 1e-9),
            )


def build(
    config: PreprocessConfig, workdir: Path, where: Located, metrics: PreprocessMetrics
) -> dict[str, Any]:
    """Build and publish the dataset `where` names, from inputs that must still be the content
    `locate` fingerprinted (else exit 1 and nothing is published)."""
    packing = dataset.packing(config)
    workers = config.workers or parallel.default_workers()
    threads = max(1, parallel.available_cpus() // workers)
    os.environ.setdefault("RAYON_NUM_THREADS", str(parallel.available_cpus()))
    log.info("%d worker process(es), %d tokenizer thread(s) each", workers, threads)
    with (
        writer.staging(where.uri, where.key, workdir) as staged,
        _disk_full_is_retried(staged, where, metrics, len(dataset.schema(config.format, packing))),
        parallel.Pool(workers, threads) as pool,
    ):
        trained = None
        if where.plan.source_dir is None:
            trained = _train_tokenizer(config, where.inputs, where.plan, pool, metrics)
        info = tokenizer.save(where.plan, trained, staged / dataset.TOKENIZER_DIR)
        if config.format == "text" and not info.splits_at_lines:
            log.warning(
                "this tokenizer encodes text differently when it is cut at line starts: long "
                "documents are encoded whole, and memory grows with the longest document"
            )
        settings = EncodeSettings(
            format=config.format,
            fields=config.fields,
            tokenizer_dir=str(staged / dataset.TOKENIZER_DIR),
            eos_id=info.eos_id,
            block_size=config.block_size,
            split_long_documents=info.splits_at_lines,
            validation_fraction=config.validation_fraction,
            seed=config.seed,
        )
        tally, splits, sources = _pack(config, where, settings, info.pad_id, staged, pool, metrics)
        counts = _counts(tally, splits)
        _check_sources(sources, counts, config)
        if not splits["train"]["rows"]:
            raise InvalidInput(
                f"no training rows: {counts['accepted']} rows accepted gave no complete block of "
                f"{config.block_size} tokens — add data, lower blockSize or set partialBlock: pad"
            )
        manifest = {
            "formatVersion": dataset.FORMAT_VERSION,
            "key": where.key,
            "format": config.format,
            "blockSize": config.block_size,
            "packing": dataset.packing(config),
            "inputs": [
                {
                    "uri": i.source.uri,
                    "split": i.source.split,
                    "fingerprint": i.identity.fingerprint,
                    "bytes": i.identity.size,
                }
                for i in where.inputs
            ],
            "tokenizer": {
                "fingerprint": where.plan.fingerprint,
                "vocabSize": info.vocab_size,
                "eosTokenId": info.eos_id,
                "padTokenId": info.pad_id,
                "trained": trained is not None,
            },
            "chatTemplate": where.plan.template,
            "splits": splits,
            "counts": counts,
            "sources": sources,
        }
        writer.write_json(staged / dataset.MANIFEST, manifest)
        (staged / dataset.SUCCESS).write_text(where.key + "\n", encoding="utf-8")
        writer.publish(staged, where.uri, config.s3)
    log.info(
        "published %s: %d rows read, %d rejected, %d tokens in %d blocks",
        where.uri,
        counts["rowsRead"],
        tally.rejected_total,
        counts["tokens"],
        counts["blocks"],
    )
    return manifest


@contextlib.contextmanager
def _disk_full_is_retried(
    staged: Path, where: Located, metrics: PreprocessMetrics, columns: int
) -> Iterator[None]:
    """ENOSPC: exit 1 (retryable) naming the path and an estimate of the bytes needed — the
    tokens produced so far at 4 bytes per column (or what was written, if more), scaled by the
    share of the input read; the staging directory is removed on the way out."""
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC and "No space left on device" not in str(error):
            raise
        written = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
        total = sum(i.identity.size for i in where.inputs)

        def sample(name: str) -> float:
            found = metrics.registry.get_sample_value(name, {"run": metrics.run})
            return found or 0.0

        read = sample(series.PREPROCESS_READ_BYTES)
        produced = max(written, int(sample(series.PREPROCESS_TOKENS)) * 4 * columns)
        needed = int(produced * total / read) if read else None
        free = shutil.disk_usage(staged).free
        estimate = f"about {needed} bytes are needed" if needed else "the need is unknown"
        raise Retryable(
            f"{error.filename or staged}: no space left on device — {written} bytes written "
            f"when {read / max(total, 1):.0%} of the input was read: {estimate}, {free} are "
            "free. The staging directory was removed; give the cache more room (the volume "
            "under cacheRoot) and the stage is retried.",
            {"reason": "DiskFull", "bytesNeeded": needed, "bytesFree": free},
        ) from None


def _pack(
    config: PreprocessConfig,
    where: Located,
    settings: EncodeSettings,
    pad_id: int,
    staged: Path,
    pool: parallel.Pool,
    metrics: PreprocessMetrics,
) -> tuple[Tally, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Encode every chunk in the workers; select each source's rows, then pack and write them
    here, in input order. A source with terms holds its encoded rows until its last chunk (its
    selection needs its accepted count); the others stream."""
    packing = dataset.packing(config)
    packers = {
        split: pack.packer(
            config.format,
            config.block_size,
            pad_id,
            config.partial_block,
            per_document=not config.cross_document_attention,
        )
        for split in dataset.SPLITS
    }
    writers = {
        split: writer.SplitWriter(staged, split, dataset.schema(config.format, packing))
        for split in dataset.SPLITS
    }
    progress = _Progress(metrics, packers)
    accounts = {
        item.config.name: mixture.SourceTally(
            item.config, len(item.files), item.excluded, item.commit
        )
        for item in where.sources
    }
    for account in accounts.values():
        files = metrics.source_files
        files.labels(metrics.run, account.config.name, "read").set(account.files)
        files.labels(metrics.run, account.config.name, "excluded").set(account.excluded)
    held: list[dict[str, Columns]] = []

    def write(account: mixture.SourceTally, splits: dict[str, Columns]) -> None:
        for split in dataset.SPLITS:
            columns = splits.get(split)
            if columns is None or not mixture.row_count(columns):
                continue
            rows, tokens = mixture.row_count(columns), mixture.row_tokens(columns)
            account.selected += rows
            account.tokens += tokens
            metrics.source_rows.labels(metrics.run, account.config.name, "selected").inc(rows)
            metrics.source_tokens.labels(metrics.run, account.config.name).inc(tokens)
            writers[split].write(packers[split].add(columns))

    def settle(account: mixture.SourceTally) -> None:
        """Write a held source's selected rows, pass by pass, each pass in read order."""
        if not held:
            return
        rows_held = sum(mixture.row_count(c[split]) for c in held for split in c)
        passes = mixture.passes(account.config, rows_held, config.seed)
        if all(len(rows) == rows_held for rows in passes):
            # Whole passes only (maxRows above the size, an integral fraction): every row in
            # read order, pass after pass — the held chunks as they are, without copies.
            for _ in passes:
                for chunk in held:
                    write(account, chunk)
            held.clear()
            return
        joined = {
            split: mixture.concatenate(parts)
            for split in dataset.SPLITS
            if (parts := [c[split] for c in held if split in c])
        }
        # Row r of the source (chunks in order, each chunk's splits in SPLITS order) is row
        # position[r] of split SPLITS[split_of[r]].
        split_of, position, seen = [], [], dict.fromkeys(dataset.SPLITS, 0)
        for chunk in held:
            for k, split in enumerate(dataset.SPLITS):
                if split in chunk:
                    n = mixture.row_count(chunk[split])
                    split_of.append(np.full(n, k))
                    position.append(np.arange(seen[split], seen[split] + n))
                    seen[split] += n
        splits, positions = np.concatenate(split_of), np.concatenate(position)
        for rows in passes:
            write(
                account,
                {
                    split: mixture.take(joined[split], positions[rows[splits[rows] == k]])
                    for k, split in enumerate(dataset.SPLITS)
                    if split in joined
                },
            )
        held.clear()

    chunks = readers.read_chunks(
        where.inputs,
        config.text_split,
        _columns(config),
        config.s3,
        config.document_separator,
    )
    current: mixture.SourceTally | None = None
    for encoded in pool.map(ChunkEncoder, (settings,), _metered(chunks, metrics)):
        progress.add(encoded)
        account = accounts[encoded.source]
        _count_source(metrics, account, encoded.tally)
        if current is not None and current is not account:
            settle(current)
        current = account
        if account.config.selects:
            held.append(encoded.splits)
        else:
            write(account, encoded.splits)
        progress.update()
    if current is not None:
        settle(current)
    for split in dataset.SPLITS:
        writers[split].write(packers[split].finish())
    progress.update()
    splits = {split: _split_summary(writers[split].close(), packers[split]) for split in writers}
    return progress.tally, splits, [a.as_dict() for a in accounts.values()]


def _count_source(metrics: PreprocessMetrics, account: mixture.SourceTally, tally: Tally) -> None:
    account.tally.merge(tally)
    rows = metrics.source_rows
    name = account.config.name
    rows.labels(metrics.run, name, "read").inc(tally.rows)
    rows.labels(metrics.run, name, "accepted").inc(tally.accepted)
    rows.labels(metrics.run, name, "rejected").inc(tally.rejected_total)
    for reason, count in tally.rejected.items():
        metrics.source_rejected.labels(metrics.run, name, reason).inc(count)


def _split_summary(shards: list[dict[str, Any]], packer: pack.Packer) -> dict[str, Any]:
    stats = packer.stats
    return {
        "shards": shards,
        "rows": stats.rows,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "paddingTokens": stats.padding,
        "droppedTokens": stats.dropped,
    }


def _counts(tally: Tally, splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in splits.values())
    padding = sum(s["paddingTokens"] for s in splits.values())
    return {
        **tally.as_dict(),
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": tokens,
        "blocks": sum(s["rows"] for s in splits.values()),
        "paddingFraction": round(padding / (tokens + padding), 6) if tokens + padding else 0.0,
        "droppedTokens": sum(s["droppedTokens"] for s in splits.values()),
    }


def _check_sources(
    sources: list[dict[str, Any]], counts: dict[str, Any], config: PreprocessConfig
) -> None:
    """Exit 2 when there are no rows at all, when a source rejects more than its
    maxRejectedFraction, or when a required source contributes no row."""
    terms = {s.name: s for s in config.sources}
    for entry in sources:
        source = terms[entry["name"]]
        limit = source.max_rejected_fraction
        _check_rejections(entry, config.max_rejected_fraction if limit is None else limit)
    for entry in sources:
        if entry["selected"] == 0 and not terms[entry["name"]].optional:
            raise InvalidInput(
                f"sources[{entry['name']}]: yielded no rows ({entry['files']} files, "
                f"{entry['excludedFiles']} excluded, {entry['rowsRead']} rows read, "
                f"{entry['accepted']} accepted, 0 selected) — check its uri, exclude globs and "
                "fraction, or set optional: true if it may be empty",
                {"source": entry["name"]},
            )
    if counts["rowsRead"] == 0:
        raise InvalidInput("the inputs hold no rows — check the files and textSplit")


def _check_rejections(entry: dict[str, Any], limit: float) -> None:
    """One source's rejections against its limit (the message names the source)."""
    rows, rejected = entry["rowsRead"], mixture.rejected_total(entry)
    if not rows or rejected / rows <= limit:
        return
    first_rejected = entry["firstRejected"]
    for reason, where in first_rejected.items():  # all the manifest would keep
        log.error("rejected %s rows, the first at %s", reason, ", ".join(where))

    def failure(first: int) -> dict[str, Any]:
        def places(reason: str) -> str:
            shown = first_rejected.get(reason, [])[:first]
            return f"first at {', '.join(shown)}" if shown else "locations in the log"

        lines = [f"  {r}: {count} ({places(r)})" for r, count in entry["rejected"].items()]
        message = (
            f"sources[{entry['name']}]: {rejected} of {rows} rows rejected "
            f"({rejected / rows:.2%}), above maxRejectedFraction {limit:.2%}:\n"
            + "\n".join(lines)
            + "\nFix or remove these rows, or raise the source's maxRejectedFraction (or "
            "data.maxRejectedFraction) if losing them is acceptable."
        )
        details = {
            "source": entry["name"],
            "rejected": entry["rejected"],
            "firstRejected": _first(entry, first),
        }
        return {"error": message, **details}

    fitted = _fit(failure)
    raise InvalidInput(fitted.pop("error"), fitted)


def _first(counts: dict[str, Any], first: int) -> dict[str, list[str]]:
    return {r: where[:first] for r, where in counts["firstRejected"].items()}


def _fit(build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """build(n) with the most locations per reason (≤ RESULT_FIRST) that fits RESULT_BUDGET."""
    for first in range(RESULT_FIRST, 0, -1):
        built = build(first)
        if len(json.dumps(built, separators=(",", ":")).encode()) <= RESULT_BUDGET:
            return built
    return build(0)


def _result(manifest: dict[str, Any], pointer: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The ≤ 4 KiB summary the operator reads (status.dataset)."""
    counts, splits = manifest["counts"], manifest["splits"]
    return _fit(
        lambda first: {
            "key": pointer["key"],
            "uri": pointer["uri"],
            "cacheHit": pointer["cacheHit"],
            "format": manifest["format"],
            "rowsRead": counts["rowsRead"],
            "accepted": counts["accepted"],
            "rejected": counts["rejected"],
            "firstRejected": _first(counts, first),
            "trainTokens": splits["train"]["tokens"],
            "validationTokens": splits["validation"]["tokens"],
            "trainRows": splits["train"]["rows"],
            "validationRows": splits["validation"]["rows"],
            "tokens": counts["tokens"],
            "blocks": counts["blocks"],
            "paddingFraction": counts["paddingFraction"],
            "droppedTokens": counts["droppedTokens"],
            "sources": [
                {k: v for k, v in entry.items() if k != "firstRejected"}
                for entry in manifest["sources"]
            ],
            "seconds": round(seconds, 3),
        }
    )
