"""Encoded rows → training rows of the dataset format (runs in the main process, in input order).

* text: one token stream cut into exact blocks with numpy; only the final partial block is padded
  (labels -100) or dropped, and counted either way. With `crossDocumentAttention: false` the
  blocks carry position_ids that restart at every document (padding is a segment of its own), so
  attention stays within documents as it does for chat rows.
* chat: whole examples packed best-fit into blocks, never split. Streaming best-fit: each example
  goes into the open block with the least room that still fits it; when none fits and OPEN_BINS
  blocks are open, the fullest is written out. Memory is OPEN_BINS blocks whatever the input size,
  and the result depends only on the order of the examples.
* preference: one pair per row, as encoded.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from kubetrain_trainer.preprocess.dataset import OPEN_BINS, SCHEMAS
from kubetrain_trainer.preprocess.encode import IGNORE, Columns


def _int32(values: np.ndarray) -> pa.Array:
    # from_buffers, not pa.array: the latter imports pandas (+50 MB of RSS) on first use.
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """A list<int32> array over `values` without copying them."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(_int32(offsets), _int32(values))


@dataclass
class PackStats:
    rows: int = 0
    tokens: int = 0
    """Non-padding tokens written."""
    padding: int = 0
    dropped: int = 0
    documents: int = 0


@dataclass
class TextPacker:
    """Documents (already joined with EOS) → blocks of exactly block_size tokens."""

    block_size: int
    pad_id: int
    partial: str
    per_document: bool = False
    """Add position_ids restarting at each document (no attention across documents)."""
    stats: PackStats = field(default_factory=PackStats)
    rest: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    rest_positions: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))

    def _batch(self, ids: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> pa.RecordBatch:
        lengths = np.full(len(ids) // self.block_size, self.block_size, dtype=np.int32)
        self.stats.rows += len(lengths)
        arrays = [list_array(ids, lengths), list_array(labels, lengths)]
        if not self.per_document:
            return pa.RecordBatch.from_arrays(arrays, schema=SCHEMAS["text"])
        arrays.append(list_array(positions, lengths))
        return pa.RecordBatch.from_arrays(arrays, schema=SCHEMAS["chat"])

    def add(self, columns: Columns) -> pa.RecordBatch | None:
        tokens, lengths = columns["input_ids"]
        self.stats.documents += len(lengths)
        stream = np.concatenate([self.rest, tokens]) if self.rest.size else tokens
        positions = self.rest_positions
        if self.per_document:  # 0, 1, … within each document (lengths include its EOS)
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            own = np.arange(len(tokens), dtype=np.int32) - starts.astype(np.int32)
            positions = np.concatenate([self.rest_positions, own])
        full = len(stream) // self.block_size * self.block_size
        self.rest = stream[full:].copy()
        self.rest_positions = positions[full:].copy() if self.per_document else positions
        self.stats.tokens += full
        return self._batch(stream[:full], stream[:full], positions[:full]) if full else None

    def finish(self) -> pa.RecordBatch | None:
        rest, self.rest = self.rest, self.rest[:0]
        if not rest.size:
            return None
        if self.partial == "drop":
            self.stats.dropped += len(rest)
            return None
        pad = self.block_size - len(rest)
        self.stats.tokens += len(rest)
        self.stats.padding += pad
        ids = np.concatenate([rest, np.full(pad, self.pad_id, dtype=np.int32)])
        labels = np.concatenate([rest, np.full(pad, IGNORE, dtype=np.int32)])
        positions = np.concatenate([self.rest_positions, np.arange(pad, dtype=np.int32)])
        return self._batch(ids, labels, positions)


@dataclass
class _Bin:
    order: int
    room: int
    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)


@dataclass
class ChatPacker:
    """Whole examples → blocks by streaming best fit, with position ids restarting per example."""

    block_size: int
    pad_id: int
    stats: PackStats = field(default_factory=PackStats)
    bins: dict[int, _Bin] = field(default_factory=dict)
    by_room: list[tuple[int, int]] = field(default_factory=list)
    """(room, order) of every open bin, sorted: the best fit is a bisect away."""
    opened: int = 0

    def add(self, columns: Columns) -> pa.RecordBatch | None:
        ids, lengths = columns["input_ids"]
        labels, _ = columns["labels"]
        self.stats.documents += len(lengths)
        closed: list[_Bin] = []
        start = 0
        for length in lengths.tolist():
            example = slice(start, start + length)
            start += length
            at = bisect.bisect_left(self.by_room, (length, -1))
            if at < len(self.by_room):
                target = self.bins[self.by_room.pop(at)[1]]
            else:
                if len(self.bins) >= OPEN_BINS:
                    closed.append(self.bins.pop(self.by_room.pop(0)[1]))
                target = self.bins[self.opened] = _Bin(self.opened, self.block_size)
                self.opened += 1
            target.ids.append(ids[example].copy())  # copies: a view would pin the whole chunk
            target.labels.append(labels[example].copy())
            target.room -= length
            if target.room:
                bisect.insort(self.by_room, (target.room, target.order))
            else:
                closed.append(self.bins.pop(target.order))
        return self._batch(closed)

    def finish(self) -> pa.RecordBatch | None:
        rest = [self.bins[order] for order in sorted(self.bins)]
        self.bins, self.by_room = {}, []
        return self._batch(rest)

    def _batch(self, closed: list[_Bin]) -> pa.RecordBatch | None:
        if not closed:
            return None
        ids, labels, positions = [], [], []
        for block in closed:
            pad = block.room
            ids += [*block.ids, np.full(pad, self.pad_id, dtype=np.int32)]
            labels += [*block.labels, np.full(pad, IGNORE, dtype=np.int32)]
            positions += [np.arange(len(x), dtype=np.int32) for x in block.ids]
            positions.append(np.arange(pad, dtype=np.int32))  # padding is its own segment
            self.stats.tokens += self.block_size - pad
            self.stats.padding += pad
        lengths = np.full(len(closed), self.block_size, dtype=np.int32)
        self.stats.rows += len(closed)
        arrays = [list_array(np.concatenate(x), lengths) for x in (ids, labels, positions)]
        return pa.RecordBatch.from_arrays(arrays, schema=SCHEMAS["chat"])


@dataclass
class PreferencePacker:
    """Pairs are rows as they are; only counted."""

    stats: PackStats = field(default_factory=PackStats)

    def add(self, columns: Columns) -> pa.RecordBatch | None:
        names = SCHEMAS["preference"].names
        count = len(columns[names[0]][1])
        if not count:
            return None
        self.stats.rows += count
        self.stats.documents += count
        self.stats.tokens += sum(int(columns[n][0].size) for n in names)
        arrays = [list_array(*columns[name]) for name in names]
        return pa.RecordBatch.from_arrays(arrays, schema=SCHEMAS["preference"])

    def finish(self) -> pa.RecordBatch | None:
        return None


Packer = TextPacker | ChatPacker | PreferencePacker


def packer(
    fmt: str, block_size: int, pad_id: int, partial: str, *, per_document: bool = False
) -> Packer:
    if fmt == "text":
        return TextPacker(block_size, pad_id, partial, per_document)
    if fmt == "chat":
        return ChatPacker(block_size, pad_id)
    return PreferencePacker()
