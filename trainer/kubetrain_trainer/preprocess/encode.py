"""A chunk of raw records → validated, split and tokenized arrays (what a worker does).

Pure function of the chunk and the saved tokenizer, so 1 or N workers give the same arrays. Token
lists leave the Rust tokenizer once, through `encode_batch`/`encode_batch_fast` on the whole chunk,
and are flattened into int32 numpy arrays with one C-level pass; no per-token Python loop.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kubetrain_trainer.config import Fields
from kubetrain_trainer.preprocess import rows
from kubetrain_trainer.preprocess.readers import Chunk
from kubetrain_trainer.preprocess.rows import Reject, Tally
from kubetrain_trainer.preprocess.tokenizer import ChatRenderer, TemplateError, load, split_lines
from kubetrain_trainer.stage import InvalidInput

IGNORE = -100
#: Characters per encode_batch call for text: the Rust tokenizer needs ~150 bytes of memory per
#: character of an input (a 9 MB log file as one document took 1.4 GB), so batches are bounded.
BATCH_CHARS = 256 << 10
#: column name → (values, per-row lengths); the packers in `pack` turn these into blocks.
Columns = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class EncodeSettings:
    """Everything a worker needs (picklable: workers are spawned, not forked)."""

    format: str
    fields: Fields
    tokenizer_dir: str
    eos_id: int
    block_size: int
    split_long_documents: bool
    validation_fraction: float
    seed: int


@dataclass
class EncodedChunk:
    index: int
    source: str
    tally: Tally
    splits: dict[str, Columns] = field(default_factory=dict)


def _batches(pieces: list[str]) -> Iterator[slice]:
    """Consecutive runs of pieces of about BATCH_CHARS characters (at least one piece each)."""
    start = 0
    while start < len(pieces):
        stop, size = start, 0
        while stop < len(pieces) and (stop == start or size < BATCH_CHARS):
            size += len(pieces[stop])
            stop += 1
        yield slice(start, stop)
        start = stop


def _flatten(lists: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=total)


def _lengths(lists: list[Any]) -> np.ndarray:
    return np.fromiter(map(len, lists), dtype=np.int32, count=len(lists))


VALIDATORS: dict[str, Callable[..., Any]] = {
    "text": rows.text_document,
    "chat": rows.chat_messages,
    "preference": rows.preference_pair,
}


def validated(chunk: Chunk, fmt: str, fields: Fields) -> Iterator[tuple[Any, Any, str]]:
    """(raw record, payload or Reject, `file:line`) for every record of the chunk."""
    validate = VALIDATORS[fmt]
    row_fields = None if chunk.kind == "text" else fields
    for line, record in zip(chunk.lines, chunk.records, strict=True):
        value = rows.parse(record, chunk.kind)
        payload = value if isinstance(value, Reject) else validate(value, row_fields)
        yield record, payload, f"{chunk.uri}:{line}"


class ChunkTexts:
    """The accepted documents of a chunk as plain strings: what the BPE trainer learns from."""

    def __init__(self, fmt: str, fields: Fields) -> None:
        self.format, self.fields = fmt, fields

    def __call__(self, chunk: Chunk) -> list[str]:
        texts: list[str] = []
        for _, payload, _ in validated(chunk, self.format, self.fields):
            if isinstance(payload, Reject):
                continue
            if self.format == "text":
                texts.append(payload)
            elif self.format == "chat":
                texts += [m["content"] for m in payload]
            else:
                prompt, chosen, rejected = payload
                texts += [*(m["content"] for m in prompt), chosen, rejected]
        return texts


class ChunkEncoder:
    """Callable run in each worker; built once per worker from the dataset's tokenizer directory."""

    def __init__(self, settings: EncodeSettings) -> None:
        self.settings = settings
        self.renderer: ChatRenderer | None = None
        if settings.format == "text":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(
                str(Path(settings.tokenizer_dir, "tokenizer.json"))
            )
            # A document containing the text "<|endoftext|>" must not become an EOS token.
            self.tokenizer.encode_special_tokens = True
        else:
            hf = load(Path(settings.tokenizer_dir))
            self.renderer = ChatRenderer(hf)
            self.tokenizer = hf.backend_tokenizer
        self.threshold = int(settings.validation_fraction * 2**64)
        self.salt = str(settings.seed).encode()

    def _held_out(self, record: bytes | object) -> bool:
        """Deterministic per-row split from the row's content and the seed."""
        if not isinstance(record, bytes):
            record = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
        digest = hashlib.blake2b(record, digest_size=8, key=self.salt).digest()
        return int.from_bytes(digest, "big") < self.threshold

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        tally = Tally()
        accepted: dict[str, list[tuple[Any, str]]] = {}
        for record, payload, where in validated(chunk, self.settings.format, self.settings.fields):
            if isinstance(payload, Reject):
                tally.reject(payload.reason, where)
                continue
            tally.accept()
            split = chunk.split
            if split == "train" and self.threshold and self._held_out(record):
                split = "validation"
            accepted.setdefault(split, []).append((payload, where))
        encode = {"text": self._text, "chat": self._chat, "preference": self._preference}
        result = EncodedChunk(chunk.index, chunk.source, tally)
        for split, items in accepted.items():
            result.splits[split] = encode[self.settings.format](items, tally)
        return result

    def _text(self, items: list[tuple[Any, str]], tally: Tally) -> Columns:
        """Documents, each followed by EOS, as one flat array.

        Encoded in batches of about BATCH_CHARS characters; a long document is cut into pieces
        at line starts first (when the tokenizer gives the same ids that way), so the Rust
        tokenizer's working memory is bounded by the batch, not by the longest document.
        """
        eos = [self.settings.eos_id]
        pieces: list[str] = []
        ends: list[bool] = []  # does the piece end its document?
        for text, _ in items:
            parts = split_lines(text) if self.settings.split_long_documents else [text]
            pieces += parts
            ends += [False] * (len(parts) - 1) + [True]
        arrays, lengths, document = [], [], 0
        for batch in _batches(pieces):
            encodings = self.tokenizer.encode_batch_fast(pieces[batch], add_special_tokens=False)
            ids = [e.ids for e in encodings]
            for piece_ids, end in zip(ids, ends[batch], strict=True):
                document += len(piece_ids)
                if end:
                    lengths.append(document + 1)
                    document = 0
            tails = (eos if end else [] for end in ends[batch])
            joined = itertools.chain.from_iterable(zip(ids, tails, strict=True))
            arrays.append(_flatten(joined, sum(map(len, ids)) + sum(ends[batch])))  # type: ignore[arg-type]
        tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
        return {"input_ids": (tokens, np.asarray(lengths, dtype=np.int32))}

    def _render(self, render: Any, payload: Any, where: str) -> Any:
        try:
            return render(*payload) if isinstance(payload, tuple) else render(payload)
        except TemplateError as error:
            raise InvalidInput(
                f"{where}: cannot mask this row: {error} — use a named chatTemplate "
                "(chatml, tulu, llama3) or fix the model's template"
            ) from None

    def _chat(self, items: list[tuple[Any, str]], tally: Tally) -> Columns:
        """Whole rendered conversations with labels on the assistant spans only."""
        assert self.renderer is not None
        rendered = [self._render(self.renderer.conversation, m, w) for m, w in items]
        encodings = self.tokenizer.encode_batch(
            [text for text, _ in rendered], add_special_tokens=False
        )
        ids_out, labels_out = [], []
        for (_, spans), encoding, (_, where) in zip(rendered, encodings, items, strict=True):
            if len(encoding.ids) > self.settings.block_size:
                tally.unaccept(rows.TOO_LONG, where)
                continue
            ids = np.asarray(encoding.ids, dtype=np.int32)
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            trained = np.zeros(len(ids), dtype=bool)
            for start, end in spans:  # a token is trained if any of its characters is the answer's
                trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
            ids_out.append(ids)
            labels_out.append(np.where(trained, ids, IGNORE).astype(np.int32))
        lengths = _lengths(ids_out)
        if not ids_out:
            empty = np.empty(0, dtype=np.int32)
            return {"input_ids": (empty, lengths), "labels": (empty, lengths)}
        return {
            "input_ids": (np.concatenate(ids_out), lengths),
            "labels": (np.concatenate(labels_out), lengths),
        }

    def _preference(self, items: list[tuple[Any, str]], tally: Tally) -> Columns:
        """prompt / chosen / rejected token lists; pairs longer than a block are refused."""
        assert self.renderer is not None
        rendered = [self._render(self.renderer.preference, p, w) for p, w in items]
        texts = (
            [text for triple in zip(*rendered, strict=True) for text in triple] if rendered else []
        )
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        n = len(rendered)
        parts = [[e.ids for e in encodings[i * n : (i + 1) * n]] for i in range(3)]
        keep = []
        for i, (_, where) in enumerate(items):
            need = len(parts[0][i]) + max(len(parts[1][i]), len(parts[2][i]))
            if need > self.settings.block_size:
                tally.unaccept(rows.TOO_LONG, where)
            else:
                keep.append(i)
        columns: Columns = {}
        for name, lists in zip(("prompt_ids", "chosen_ids", "rejected_ids"), parts, strict=True):
            kept = [lists[i] for i in keep]
            lengths = _lengths(kept)
            columns[name] = (_flatten(kept, int(lengths.sum())), lengths)
        return columns
