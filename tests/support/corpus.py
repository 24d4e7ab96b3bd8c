"""Real text nobody here wrote, for tests and benchmarks: Python's own standard library sources.

They exist wherever Python does (the CI box included), are plain UTF-8 and mix prose (docstrings,
comments) with code — a fair stand-in for a messy text corpus.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_files() -> list[Path]:
    """Standard-library .py files in a stable order (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def paragraphs(max_bytes: int) -> Iterator[str]:
    """Blank-line-separated paragraphs of the standard library, up to max_bytes of UTF-8."""
    total = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for para in text.split("\n\n"):
            para = para.strip()
            if not para:
                continue
            total += len(para.encode()) + 2
            if total > max_bytes:
                return
            yield para


def write_text_corpus(path: Path, max_bytes: int) -> Path:
    """A .txt file of paragraphs separated by blank lines."""
    path.write_text("\n\n".join(paragraphs(max_bytes)) + "\n", encoding="utf-8")
    return path
