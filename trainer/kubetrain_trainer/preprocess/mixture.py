"""Sources with their own terms: which accepted rows a source contributes, and its accounting.

Selection (docs/preprocessing.md, "Sources and mixtures"): of a source's N accepted rows, in read
order, a seeded permutation P (seed: training.seed and the source's name) is taken;
`fraction` f keeps floor(f) whole passes of P and then its first round((f - floor(f)) × N)
rows; `maxRows` keeps the first maxRows of that sequence. Each pass is written in read order, so
a source without terms is written exactly as read. Rows are selected by index from the encoded
rows the stage already holds: no source is read twice.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetrain_trainer.config import SourceConfig
from kubetrain_trainer.preprocess.encode import Columns
from kubetrain_trainer.preprocess.rows import Tally


def passes(source: SourceConfig, accepted: int, seed: int) -> list[np.ndarray]:
    """The selected row indices of a source with `accepted` rows, one sorted array per pass."""
    fraction = 1.0 if source.fraction is None else source.fraction
    whole = math.floor(fraction)
    rest = round((fraction - whole) * accepted)
    salt = hashlib.blake2b(f"{seed}:{source.name}".encode(), digest_size=8).digest()
    order = np.random.default_rng(int.from_bytes(salt, "big")).permutation(accepted)
    sequence = [order] * whole + [order[:rest]]
    budget = source.max_rows
    chosen = []
    for part in sequence:
        if budget is not None:
            part, budget = part[:budget], budget - min(budget, len(part))
        if len(part):
            chosen.append(np.sort(part))
    return chosen


def take(columns: Columns, rows: np.ndarray) -> Columns:
    """The given rows of encoded columns (values with per-row lengths), in the given order."""
    out: Columns = {}
    for name, (values, lengths) in columns.items():
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        picked = lengths[rows].astype(np.int64)
        begin = np.cumsum(picked) - picked
        index = np.repeat(starts[rows] - begin, picked) + np.arange(int(picked.sum()))
        out[name] = (values[index], lengths[rows])
    return out


def concatenate(parts: list[Columns]) -> Columns:
    """Encoded columns of consecutive chunks as one."""
    return {
        name: (
            np.concatenate([p[name][0] for p in parts]),
            np.concatenate([p[name][1] for p in parts]),
        )
        for name in parts[0]
    }


def row_count(columns: Columns) -> int:
    return len(next(iter(columns.values()))[1])


def row_tokens(columns: Columns) -> int:
    """Tokens the rows bring to packing: input ids (text, chat), or prompt + both answers."""
    names = ["input_ids"] if "input_ids" in columns else list(columns)
    return int(sum(int(columns[n][1].sum()) for n in names))


@dataclass
class SourceTally:
    """One source's accounting: files, rows read, accepted, rejected by reason, selected, tokens."""

    config: SourceConfig
    files: int
    excluded: int
    commit: str | None = None
    """A Hub dataset's revision resolved to its commit (shown in status); None otherwise."""
    tally: Tally = field(default_factory=Tally)
    selected: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        counts = self.tally.as_dict()
        return {
            "name": self.config.name,
            "split": self.config.split,
            "files": self.files,
            "excludedFiles": self.excluded,
            "rowsRead": counts["rowsRead"],
            "accepted": counts["accepted"],
            "rejected": counts["rejected"],
            "selected": self.selected,
            "tokens": self.tokens,
            "commit": self.commit,
            "firstRejected": counts["firstRejected"],
        }


def rejected_total(entry: dict[str, Any]) -> int:
    return sum(Counter(entry["rejected"]).values())
