"""Local writes that readers see whole or not at all: a temp file beside the target, fsync, rename.

(On S3 an object appears whole or not at all by itself; there "atomic" means writing the marker
object last, which `transfers.upload_dir` does.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (what makes a rename in it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, fill: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
