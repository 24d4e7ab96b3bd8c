"""The packed dataset as the trainer sees it: memory-mapped Arrow shards and a resumable order.

The preprocess stage publishes `<cacheRoot>/datasets/<key>/` (docs/dataset-format.md) and a pointer
`dataset.json` naming it. Here the pointer is followed and the directory fetched once (S3) or used
in place (local, pvc), verified (`_SUCCESS`, every shard's sha256) and memory-mapped with the
format's own reader (`preprocess.dataset`): rows come straight from the page cache, so a 100 GB
dataset costs no RAM and opens in milliseconds.

The sample order is an endless stream of seeded epoch permutations. A run consumes that stream in
steps of the global batch, so the data position is a single integer — samples consumed — that a
checkpoint records and a restart resumes from exactly, even when the number of processes changed.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from kubetrain_trainer import storage
from kubetrain_trainer.config import S3Settings
from kubetrain_trainer.preprocess import dataset as dataset_format
from kubetrain_trainer.stage import InvalidInput

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Which columns each format stores (docs/dataset-format.md).
COLUMNS = {
    "text": ("input_ids", "labels"),
    "chat": ("input_ids", "labels", "position_ids"),
    "preference": ("prompt_ids", "chosen_ids", "rejected_ids"),
}
#: The key under which a collated batch carries its bookkeeping (removed before the forward).
STATS_KEY = "kubetrain_batch_stats"


class BlockDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Rows of a text or chat split: fixed-size token blocks, read from memory-mapped shards.

    Each item is `{"row": i, "input_ids": …, "labels": …[, "position_ids": …]}` as int64 arrays;
    no attention mask, so a chat row's restarting position_ids keep attention within examples.
    """

    def __init__(self, table: pa.Table, columns: Sequence[str], block_size: int) -> None:
        self.columns, self.block_size = tuple(columns), block_size
        self._chunks: list[dict[str, np.ndarray]] = []
        starts = [0]
        per_column = [table.column(name).chunks for name in self.columns]
        for parts in zip(*per_column, strict=True):
            self._chunks.append(
                {
                    name: self._blocks(name, part)
                    for name, part in zip(self.columns, parts, strict=True)
                }
            )
            starts.append(starts[-1] + len(parts[0]))
        self._starts = starts

    def _blocks(self, name: str, part: pa.ListArray) -> np.ndarray:
        lengths = np.diff(part.offsets.to_numpy())
        if len(lengths) and (lengths != self.block_size).any():
            raise InvalidInput(
                f"dataset: column {name} has rows of {int(lengths.min())}–{int(lengths.max())} "
                f"tokens, the manifest says blockSize {self.block_size} — the dataset is damaged "
                "or from another release: delete its directory and rerun preprocessing"
            )
        values: np.ndarray = part.flatten().to_numpy(zero_copy_only=True)
        return values.reshape(-1, self.block_size)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = bisect.bisect_right(self._starts, index) - 1
        arrays = self._chunks[chunk]
        local = index - self._starts[chunk]
        item: dict[str, Any] = {"row": index}
        item.update({name: arrays[name][local].astype(np.int64) for name in self.columns})
        return item


def count_block_tokens(item: Mapping[str, Any]) -> int:
    """Non-padding tokens of a block: padding is the label-less tail of the last block."""
    labels = item["labels"]
    if "position_ids" not in item:
        return int((labels != IGNORE_INDEX).sum())
    # Chat blocks: the preprocess stage writes padding as its own last segment (positions restart
    # at 0, no labels).
    positions = item["position_ids"]
    starts = np.flatnonzero(positions == 0)
    last = int(starts[-1]) if len(starts) else 0
    return last if (labels[last:] == IGNORE_INDEX).all() and last > 0 else len(labels)


def count_preference_tokens(item: Mapping[str, Any]) -> int:
    """Tokens the policy reads for one pair: the prompt twice, both completions once."""
    prompt = len(item["prompt_ids"])
    return 2 * prompt + len(item["chosen_ids"]) + len(item["rejected_ids"])


@dataclass
class BatchStats:
    """Which rows a micro-batch holds and how many non-padding tokens; read by the callbacks."""

    rows: list[int]
    tokens: int


def count_labelled_tokens(batch: Mapping[str, Any]) -> int:
    """Non-padding tokens of a collated text batch: its labelled positions (one vector op)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


class AccountingCollator:
    """Wraps a collator: takes the `row` ids out of the items and attaches :class:`BatchStats`.

    Tokens are counted per item (`count_tokens`) or, where one operation on the collated batch
    gives the same number, once per batch (`count_batch`: text blocks, a step's hot path).
    """

    def __init__(
        self,
        inner: Callable[[list[dict[str, Any]]], dict[str, Any]],
        count_tokens: Callable[[Mapping[str, Any]], int] | None = None,
        prompt_limit: int | None = None,
        count_batch: Callable[[Mapping[str, Any]], int] | None = None,
    ) -> None:
        assert (count_tokens is None) != (count_batch is None), "one way of counting tokens"
        self.inner, self.count_tokens, self.prompt_limit = inner, count_tokens, prompt_limit
        self.count_batch = count_batch

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [int(item.pop("row")) for item in items]
        if self.prompt_limit is not None:  # dpo.maxPromptLength: keep the prompt's end
            for item in items:
                item["prompt_ids"] = item["prompt_ids"][-self.prompt_limit :]
        tokens = 0
        if self.count_tokens is not None:
            tokens = sum(self.count_tokens(item) for item in items)
        batch = self.inner(items)
        if self.count_batch is not None:
            tokens = self.count_batch(batch)
        batch[STATS_KEY] = BatchStats(rows=rows, tokens=tokens)
        return batch


def stack_blocks(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Fixed-size blocks need no padding: stack each column."""
    return {name: torch.from_numpy(np.stack([item[name] for item in items])) for name in items[0]}


class StreamSampler(torch.utils.data.Sampler[int]):
    """Row indices from position `start` to `stop` of the stream perm(seed, 0) ++ perm(seed, 1) ++ …

    Position p is row `permutation(p // rows)[p % rows]`: a pure function of (seed, p), so the run
    that consumed p samples and was killed continues with sample p, no matter how many processes
    share the stream now. Epoch boundaries fall inside steps; nothing is dropped or repeated.
    """

    def __init__(self, rows: int, seed: int, start: int, stop: int) -> None:
        if rows <= 0:
            raise InvalidInput(
                "datasetPointer: the dataset's training split has no rows — check data.train and "
                "the rejected-row counts in the dataset's manifest.json, then rerun preprocessing"
            )
        self.rows, self.seed, self.start, self.stop = rows, seed, start, stop

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def positions(self, start: int, stop: int) -> Iterator[int]:
        """Rows at stream positions [start, stop)."""
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.rows)
            take = min(self.rows - offset, stop - position)
            yield from self.permutation(epoch)[offset : offset + take].tolist()
            position += take

    def __iter__(self) -> Iterator[int]:
        return self.positions(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StreamPosition:
    """Where a run is in the sample stream: `start_sample` at `start_step`, then a global batch
    of `samples_per_step` per optimizer step (the batch may differ from the previous attempt's)."""

    start_step: int
    start_sample: int
    samples_per_step: int

    def at(self, step: int) -> int:
        return self.start_sample + (step - self.start_step) * self.samples_per_step


@dataclass
class PackedDataset:
    """A verified dataset: its manifest, tokenizer directory and splits."""

    root: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def format(self) -> str:
        return str(self.manifest["format"])

    @property
    def block_size(self) -> int:
        return int(self.manifest["blockSize"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / dataset_format.TOKENIZER_DIR

    def rows(self, split: str) -> int:
        info = self.manifest["splits"].get(split)
        return int(info["rows"]) if info else 0

    def table(self, split: str) -> pa.Table:
        return dataset_format.open_split(self.root, self.manifest, split)

    @property
    def columns(self) -> tuple[str, ...]:
        """The format's columns; text packed per document adds position_ids."""
        if self.manifest.get("packing") == dataset_format.TEXT_PER_DOCUMENT:
            return (*COLUMNS[self.format], "position_ids")
        return COLUMNS[self.format]

    def split(self, split: str) -> BlockDataset | None:
        """A text/chat split as a :class:`BlockDataset` (None when it has no rows)."""
        if not self.rows(split):
            return None
        return BlockDataset(self.table(split), self.columns, self.block_size)

    def preference_split(self, split: str) -> datasets.Dataset | None:
        """A preference split as a `datasets.Dataset` (what TRL takes), with a `row` column."""
        import datasets
        from datasets.table import InMemoryTable

        if not self.rows(split):
            return None
        table = self.table(split)
        table = table.append_column("row", pa.array(np.arange(len(table), dtype=np.int64)))
        return datasets.Dataset(InMemoryTable(table))

    def collator(
        self,
        inner: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        prompt_limit: int | None = None,
    ) -> AccountingCollator:
        if self.format == "text":  # padding is exactly the unlabelled positions
            return AccountingCollator(inner or stack_blocks, count_batch=count_labelled_tokens)
        count = count_preference_tokens if self.format == "preference" else count_block_tokens
        return AccountingCollator(inner or stack_blocks, count, prompt_limit)


def open_dataset(
    pointer_uri: str, workdir: Path, s3: S3Settings, *, check: bool = True
) -> PackedDataset:
    """Follow the pointer to a verified local copy (`check=False` trusts a sibling's check)."""
    pointer = dataset_format.read_pointer(pointer_uri, s3)
    uri, cache = str(pointer["uri"]), workdir / "datasets"
    if check:
        root, manifest = dataset_format.verify_dataset(uri, s3, cache)
    else:
        manifest = dataset_format.load_manifest(uri, s3)
        root = cache / manifest["key"] if storage.is_s3(uri) else storage.local_path(uri)
    if manifest.get("key") != pointer.get("key"):
        raise InvalidInput(
            f"dataset {uri}: manifest key {manifest.get('key')} differs from the pointer's "
            f"{pointer.get('key')} — the cache directory was overwritten; rerun preprocessing"
        )
    if manifest["format"] not in COLUMNS:
        raise InvalidInput(
            f"datasetPointer: the dataset {uri} has format {manifest['format']!r}, this trainer "
            f"reads {', '.join(COLUMNS)} — it was written by another release of the preprocess "
            "stage: rerun preprocessing with the trainer image of the operator's release"
        )
    log.info(
        "dataset %s: %s, block %d, %d train / %d validation rows",
        manifest["key"][:12],
        manifest["format"],
        manifest["blockSize"],
        int(manifest["splits"]["train"]["rows"]),
        int(manifest["splits"].get("validation", {}).get("rows", 0)),
    )
    return PackedDataset(root=root, manifest=manifest)
