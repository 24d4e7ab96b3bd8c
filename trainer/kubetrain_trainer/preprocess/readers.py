"""Input files → fixed-size chunks of raw records, streamed, with their `file:line`.

The reader does only what must happen in order: open (local or S3), decompress (.gz, .zst), and cut
the byte stream into records — JSON Lines lines, text paragraphs or lines, JSON array elements,
Parquet rows. Decoding and validation happen in the workers (`rows`, `encode`). Chunk boundaries
depend only on the input, never on the worker count, so the output does not either.

How each kind is read (docs/preprocessing.md):
* `.jsonl`: one JSON object per line; blank lines are not rows.
* `.json`: a JSON array of objects, streamed element by element; a file that does not start with
  `[` is read as JSON Lines (many tools write JSON Lines with this extension). A broken array cannot
  be cut into rows, so it fails the stage naming the line.
* `.txt`: `documentSeparator` set — the text between two occurrences of it (TinyStories'
  `<|endoftext|>` lines), blank lines kept; otherwise `textSplit: paragraph` — blank-line-separated
  paragraphs; `line` — each non-blank line.
* `.parquet`: one row per table row (S3 objects are first copied to a local temp file: Parquet needs
  random access to its footer; a local file is hashed, then parsed from the same descriptor).
A record longer than MAX_RECORD_BYTES is skipped without being held in memory (reason tooLong).
A truncated or corrupt `.gz`/`.zst` stream and an invalid Parquet file stop the stage with exit 2,
naming the file and the last line read: the file itself must be replaced.

The bytes read are the bytes keyed: a local input is hashed as it is read and compared with the
fingerprint its cache key was computed from (exit 1, nothing published, on a mismatch), and an S3
input is read pinned to the ETag and version seen when it was fingerprinted.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from kubetrain_trainer import storage
from kubetrain_trainer.config import PreprocessConfig, S3Settings, SourceConfig
from kubetrain_trainer.preprocess.rows import RecordKind
from kubetrain_trainer.stage import InvalidInput
from kubetrain_trainer.storage import hub_datasets

#: Raw bytes per chunk (a chunk holds at least one record): large enough to amortise a worker
#: round trip and an encode_batch call, small enough to keep 2 × workers chunks in flight cheaply.
CHUNK_BYTES = 256 << 10
#: Rows per chunk for inputs whose size is not known row by row (Parquet, JSON arrays).
CHUNK_RECORDS = 2048
#: A single record above this is refused (tooLong) instead of growing memory without bound.
MAX_RECORD_BYTES = 32 << 20
_BLOCK = 1 << 20
_BOM = codecs.BOM_UTF8
_COMPRESSIONS = {".gz": "gz", ".gzip": "gz", ".zst": "zst", ".zstd": "zst"}
_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".txt": "txt",
    ".parquet": "parquet",
}

InputKind = Literal["jsonl", "json", "txt", "parquet"]


@dataclass(frozen=True)
class Source:
    """One input file, the split its rows go to and the data source it belongs to."""

    uri: str
    split: str
    kind: InputKind
    compression: str
    name: str = ""


@dataclass(frozen=True)
class Listed:
    """A data source's files (after exclusion), in read order, and what its key depends on."""

    config: SourceConfig
    files: list[Source]
    excluded: int
    """Files found under the URI that an exclude glob left out."""
    commit: str | None
    """A Hub dataset's revision resolved to a commit; None for other sources."""


@dataclass(frozen=True)
class Input:
    """One input and the identity of the content its cache key was computed from."""

    source: Source
    identity: storage.Identity


@dataclass
class Chunk:
    """Consecutive records of one source; the unit of work of a worker."""

    index: int
    uri: str
    split: str
    kind: RecordKind
    source: str
    lines: list[int]
    records: list[bytes | object | None]
    nbytes: int


def source(uri: str, split: str, where: str, source_name: str = "") -> Source:
    """Classify an input by its name; refuse what cannot be read."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    stem, dot, ext = name.rpartition(".")
    compression = _COMPRESSIONS.get(f".{ext}", "")
    if compression:
        stem, dot, ext = stem.rpartition(".")
    kind = _KINDS.get(f".{ext}") if dot else None
    if kind is None or (kind == "parquet" and compression):
        raise InvalidInput(
            f"{where}: {uri}: cannot tell how to read this file — name it *.jsonl, *.json, "
            "*.txt or *.parquet (the first three may end in .gz or .zst)"
        )
    return Source(uri, split, kind, compression, source_name)  # type: ignore[arg-type]


def _below(pattern: str, found: str) -> str:
    """The path of a found file below its pattern's static prefix (what exclude globs see)."""
    static = pattern[: min((pattern.index(c) for c in "*?[" if c in pattern), default=len(pattern))]
    base = static if static.endswith("/") else static.rpartition("/")[0] + "/"
    return found.removeprefix(base) if found.startswith(base) else found.rpartition("/")[2]


def _hub_files(src: SourceConfig, workdir: Path) -> tuple[list[str], str]:
    """A Hub dataset's selected files, fetched under the workdir, and the commit they are at:
    the one place that reads hf://datasets/ URIs (storage.hub_datasets)."""
    assert src.hub is not None
    dest = workdir / ".kubetrain-cache" / "hub-datasets" / src.name
    fetched = hub_datasets.fetch_dataset(
        src.uri, dest, config=src.hub.config, split=src.hub.split, files=src.hub.files
    )
    return [str(path) for path in fetched.files], fetched.commit


def _files(
    src: SourceConfig, where: str, config: PreprocessConfig, workdir: Path
) -> tuple[list[str], str | None]:
    """The files a source's URI names and, for a Hub dataset, its commit; an optional source
    whose URI names nothing has no files (a required one fails naming it)."""
    try:
        if hub_datasets.is_dataset(src.uri):
            return _hub_files(src, workdir)
        return storage.expand(src.uri, where, config.s3), None
    except storage.NotFound:
        if src.optional:
            return [], None
        raise


def sources(config: PreprocessConfig, workdir: Path) -> list[Listed]:
    """Every data source in canonical order (train, then validation; by name within a split),
    with its files: prefixes and globs expanded (sorted), excluded files left out, so each file
    read is fingerprinted into the cache key on its own."""
    listed = []
    for split in ("train", "validation"):
        for src in config.split_sources(split):
            where = f"sources[{src.name}]"
            found, commit = _files(src, where, config, workdir)
            kept = [
                uri
                for uri in found
                if not any(fnmatch.fnmatchcase(_below(src.uri, uri), g) for g in src.exclude)
            ]
            files = [source(uri, split, where, src.name) for uri in kept]
            listed.append(Listed(src, files, len(found) - len(kept), commit))
    if config.format != "text":
        for src in (f for item in listed for f in item.files):
            if src.kind == "txt":
                raise InvalidInput(
                    f"{src.uri}: .txt files hold plain documents; format {config.format} needs "
                    "rows with fields — use .jsonl, .json or .parquet"
                )
    return listed


class _Counting(io.RawIOBase):
    """Counts the stored (compressed) bytes read, for kubetrain_preprocess_read_bytes_total, and
    hashes them, to compare with the input's fingerprint."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner, self.count, self.digest = inner, 0, hashlib.sha256()
        self.drained = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        self.digest.update(data)
        return len(data)

    def drain(self, into: IO[bytes] | None = None) -> None:
        """Read (into `into`, if given) what the parser left, so the digest covers every byte;
        once: a Parquet file is drained before it is parsed from the same descriptor."""
        if self.drained:
            return
        self.drained = True
        while data := self.inner.read(_BLOCK):
            self.count += len(data)
            self.digest.update(data)
            if into is not None:
                into.write(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def _decompressed(counting: _Counting, compression: str) -> IO[bytes]:
    buffered = io.BufferedReader(counting, _BLOCK)
    if compression == "gz":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if compression == "zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return io.BufferedReader(reader, _BLOCK)
    return buffered


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its ending) — None for a line above MAX_RECORD_BYTES."""
    number = 0
    while line := stream.readline(MAX_RECORD_BYTES + 1):
        number += 1
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest without keeping it
                line = stream.readline(_BLOCK)
            yield number, None
            continue
        yield number, line.rstrip(b"\r\n")


def _non_blank_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    for number, line in _lines(stream):
        if line is None or line.strip():
            yield number, line


def _paragraphs(stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """Blank-line-separated paragraphs, their lines joined with "\n" (CRLF normalised)."""
    parts: list[bytes] = []
    start, size = 0, 0
    for number, line in _lines(stream):
        if line is not None and not line.strip():
            if start:
                yield start, (b"\n".join(parts) if size <= MAX_RECORD_BYTES else None)
            start, parts, size = 0, [], 0
            continue
        start = start or number
        if line is None or size > MAX_RECORD_BYTES:
            size = MAX_RECORD_BYTES + 1
            parts = []
        else:
            parts.append(line)
            size += len(line) + 1
    if start:
        yield start, (b"\n".join(parts) if size <= MAX_RECORD_BYTES else None)


def _separated(stream: IO[bytes], separator: bytes) -> Iterator[tuple[int, bytes | None]]:
    """Documents ending at each occurrence of `separator` (blank lines inside are kept); empty
    documents (two separators in a row, a trailing one) are not rows."""
    parts: list[bytes] = []
    start, size = 0, 0

    def document() -> tuple[int, bytes | None]:
        text = b"\n".join(parts).strip(b"\r\n")
        return start, (text if size <= MAX_RECORD_BYTES else None)

    for number, line in _lines(stream):
        pieces = [None] if line is None else line.split(separator)
        for k, piece in enumerate(pieces):
            if k:  # a separator ended the document before this piece
                if start and (size > MAX_RECORD_BYTES or b"".join(parts).strip()):
                    yield document()
                start, parts, size = 0, [], 0
            if piece is None or size > MAX_RECORD_BYTES:
                start, size, parts = start or number, MAX_RECORD_BYTES + 1, []
            elif piece.strip() or start:
                start = start or number
                parts.append(piece)
                size += len(piece) + 1
    if start and (size > MAX_RECORD_BYTES or b"".join(parts).strip()):
        yield document()


_WS = re.compile(r"\s*")


def _json_array(stream: IO[bytes], uri: str) -> Iterator[tuple[int, object]]:
    """Elements of a top-level JSON array, parsed one at a time from a bounded buffer."""
    decode = codecs.getincrementaldecoder("utf-8-sig")().decode
    parser = json.JSONDecoder()
    buf, pos, line, eof = "", 0, 1, False

    def fail(problem: str, at: int) -> InvalidInput:
        where = f"{uri}:{line + buf.count(chr(10), pos, at)}"
        return InvalidInput(
            f"{where}: {problem} — a .json input must be one JSON array of objects; fix the file "
            "or convert it to JSON Lines (.jsonl), where a bad row is skipped and counted"
        )

    def more() -> None:
        nonlocal buf, pos, eof
        try:
            block = stream.read(_BLOCK)
            text = decode(block, final=not block)
        except UnicodeDecodeError as error:
            raise fail(f"invalid UTF-8 ({error.reason})", len(buf)) from None
        eof = not block
        buf, pos = buf[pos:] + text, 0

    def advance(to: int) -> None:
        nonlocal pos, line
        line += buf.count("\n", pos, to)
        pos = to

    def next_char() -> str:
        while True:
            advance(_WS.match(buf, pos).end())  # type: ignore[union-attr]
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            more()

    if next_char() != "[":
        raise fail("expected '['", pos)
    advance(pos + 1)
    if next_char() == "]":
        return
    while True:
        next_char()
        while True:
            try:
                value, end = parser.raw_decode(buf, pos)
            except json.JSONDecodeError as error:
                if eof:
                    raise fail(f"invalid JSON: {error.msg}", error.pos) from None
                more()
                continue
            if end < len(buf) or eof:  # a number at the buffer's end may continue
                break
            more()
        yield line, value
        advance(end)
        separator = next_char()
        advance(pos + 1)
        if separator == "]":
            break
        if separator != ",":
            raise fail(f"expected ',' or ']' after an element, got {separator!r}", pos - 1)
    if next_char():
        raise fail("unexpected content after the array", pos)


def _parquet(table: IO[bytes], columns: list[str]) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(table) as file:
        present = [c for c in columns if c in file.schema_arrow.names]
        number = 0
        for batch in file.iter_batches(batch_size=CHUNK_RECORDS, columns=present):
            for row in batch.to_pylist():
                number += 1
                yield number, row


def _is_array(stream: IO[bytes]) -> bool:
    head = stream.peek(_BLOCK)  # type: ignore[attr-defined]
    return bool(head.removeprefix(_BOM).lstrip()[:1] == b"[")


@contextlib.contextmanager
def _opened(
    inp: Input, text_split: str, columns: list[str], s3: S3Settings | None, separator: str | None
) -> Iterator[tuple[RecordKind, Iterator[tuple[int, bytes | object | None]], _Counting]]:
    """The records of one input, and the counter (and hash) of stored bytes read so far."""
    src = inp.source
    with contextlib.ExitStack() as stack:
        stored = stack.enter_context(storage.open_binary(src.uri, s3, inp.identity.pin))
        counting = _Counting(stored)
        if src.kind == "parquet":  # random access: a local copy of an S3 object, else the file
            local = not storage.is_s3(src.uri)
            table = stored if local else stack.enter_context(tempfile.TemporaryFile(prefix="kt-"))
            counting.drain(None if local else table)
            table.seek(0)
            yield "value", _parquet(table, columns), counting
            return
        stream = stack.enter_context(_decompressed(counting, src.compression))
        if src.kind == "txt" and separator is not None:
            yield "text", _separated(stream, separator.encode()), counting
        elif src.kind == "txt":
            split = _paragraphs if text_split == "paragraph" else _non_blank_lines
            yield "text", split(stream), counting
        elif src.kind == "json" and _is_array(stream):
            yield "value", _json_array(stream, src.uri), counting
        else:
            yield "json", _non_blank_lines(stream), counting


def _verify(inp: Input, counting: _Counting) -> None:
    """Exit 1 unless the bytes read are the bytes fingerprinted: published under the key of
    other content, the rows would poison every later cache hit. S3 reads are pinned instead."""
    if inp.identity.pin is not None:
        return
    counting.drain()
    if f"sha256:{counting.digest.hexdigest()}" != inp.identity.fingerprint:
        raise storage.Changed(inp.source.uri)


def _corruption_errors(src: Source) -> tuple[type[BaseException], ...]:
    """What a damaged file of this kind raises while it is read (not a transient I/O error)."""
    if src.kind == "parquet":
        import pyarrow as pa

        return (pa.ArrowException,)
    if src.compression == "zst":
        import zstandard

        return (zstandard.ZstdError, EOFError)
    return (gzip.BadGzipFile, EOFError, zlib.error) if src.compression == "gz" else ()


def _guarded(
    records: Iterator[tuple[int, bytes | object | None]], src: Source
) -> Iterator[tuple[int, bytes | object | None]]:
    """The records, or exit 2 naming the file and where it broke: corrupt data is bad input."""
    damaged = _corruption_errors(src)
    number = 0
    while True:
        try:
            number, record = next(records)
        except StopIteration:
            return
        except damaged as error:
            if src.kind == "parquet":
                problem = f"not a valid Parquet file ({error})"
                fix = "write it again (pyarrow.parquet.write_table) or convert it to .jsonl"
            else:
                problem = f"the {src.compression} stream is truncated or corrupt ({error})"
                fix = "the file was cut short or damaged in transfer: replace it (test it with "
                fix += "`gzip -t` or `zstd -t`)"
            after = f" after line {number}" if number else " at its start"
            raise InvalidInput(f"{src.uri}: {problem}{after} — {fix}") from None
        yield number, record


def read_chunks(
    inputs: list[Input],
    text_split: str,
    columns: list[str],
    s3: S3Settings | None = None,
    separator: str | None = None,
) -> Iterator[Chunk]:
    """All records of all inputs, in input order, cut into chunks of about CHUNK_BYTES; an input
    whose bytes are not the ones fingerprinted fails before its last chunk (`_verify`)."""
    index = 0
    for inp in inputs:
        src = inp.source
        with _opened(inp, text_split, columns, s3, separator) as (kind, records, counting):
            lines: list[int] = []
            batch: list[bytes | object | None] = []
            size, reported = 0, 0
            for number, record in _guarded(records, src):
                lines.append(number)
                batch.append(record)
                size += len(record) if isinstance(record, bytes) else 0
                if size >= CHUNK_BYTES or (kind == "value" and len(batch) >= CHUNK_RECORDS):
                    nbytes, reported = counting.count - reported, counting.count
                    yield Chunk(index, src.uri, src.split, kind, src.name, lines, batch, nbytes)
                    index, size, lines, batch = index + 1, 0, [], []
            _verify(inp, counting)
            if batch or counting.count > reported:
                nbytes = counting.count - reported
                yield Chunk(index, src.uri, src.split, kind, src.name, lines, batch, nbytes)
                index += 1
