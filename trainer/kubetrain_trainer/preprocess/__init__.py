"""The preprocess stage: read → validate → (train BPE) → tokenize → pack → Arrow shards + manifest.

    python -m kubetrain_trainer preprocess --config preprocess.json

Modules, in the order data flows through them: `readers` (files → chunks of raw records), `rows`
(validation and the tally of rejects), `tokenizer` (train/load/save, chat templates), `encode` (a
chunk → token arrays, in the workers), `parallel` (worker processes), `pack` (blocks), `writer`
(shards, atomic publication), `dataset` (the format: key, manifest, verification — what readers
import), `pipeline` (the stage itself). Design notes: docs/preprocessing.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetrain_trainer.config import PreprocessConfig


def run(config: PreprocessConfig, workdir: Path) -> dict[str, Any]:
    """The stage entry point (`python -m kubetrain_trainer preprocess`): see `pipeline.run`.

    Imported lazily so that worker processes, which import `encode`, do not load the writer's
    libraries (pyarrow, the metrics server) they never use.
    """
    from kubetrain_trainer.preprocess import pipeline

    return pipeline.run(config, workdir)
