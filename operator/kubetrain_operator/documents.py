"""Run files: read TrainingRun documents (a file, or `-` for stdin) and resolve `fromRun` chains.

Shared by the CLI's validate/render and by `kubetrain run`; it knows files and YAML, nothing of
how a run is executed. A problem is reported per file and line, never raised past the caller.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetrain_operator.api import KIND, InvalidRun, Problem, SpecError, TrainingRun, parse_run
from kubetrain_operator.plan import upstream_model_uri

STDIN = Path("-")


@dataclass(frozen=True)
class Loaded:
    """A TrainingRun document read from a file, or the problems that stopped it."""

    file: Path
    run: TrainingRun | None
    problems: tuple[Problem, ...] = ()


def _read(path: Path) -> str:
    if path == STDIN:
        return sys.stdin.read()
    return path.read_text(encoding="utf-8")


def load_runs(path: Path) -> Iterator[Loaded]:
    """Every TrainingRun in a (multi-document) YAML file, or stdin for `-`; other kinds are
    reported."""
    try:
        documents = list(yaml.safe_load_all(_read(path)))
    except OSError as error:
        problem = f"cannot read: {error.strerror} — check the path"
        yield Loaded(path, None, (Problem("(file)", problem),))
        return
    except UnicodeDecodeError:
        problem = "is not UTF-8 text — pass a YAML file"
        yield Loaded(path, None, (Problem("(file)", problem),))
        return
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        reason = getattr(error, "problem", None) or str(error)
        yield Loaded(path, None, (Problem(where, f"invalid YAML: {reason} — fix the syntax"),))
        return
    documents = [d for d in documents if d is not None]
    if not documents:
        yield Loaded(path, None, (Problem("(file)", f"no {KIND} found — the file is empty"),))
    for document in documents:
        if not isinstance(document, dict) or document.get("kind") != KIND:
            kind = document.get("kind") if isinstance(document, dict) else type(document).__name__
            problem = f"expected {KIND}, got {kind!r} — remove the document or check its kind"
            yield Loaded(path, None, (Problem("kind", problem),))
            continue
        try:
            yield Loaded(path, parse_run(document))
        except InvalidRun as error:
            yield Loaded(path, None, tuple(error.problems))


def resolve_upstream(run: TrainingRun, file: Path, others: list[Loaded]) -> str | None:
    """The model URI a `fromRun` chain starts from: the named run among the given files, else in
    the same directory — as the operator would find it in the namespace."""
    name = run.spec.model.from_run
    if name is None:
        return None
    candidates = [o.run for o in others if o.run is not None]
    folder = Path.cwd() if file == STDIN else file.parent
    if not any(r.name == name for r in candidates):
        for sibling in sorted(folder.glob("*.y*ml")):
            if file == STDIN or sibling.resolve() != file.resolve():
                candidates += [o.run for o in load_runs(sibling) if o.run is not None]
    for candidate in candidates:
        if candidate.name == name:
            return upstream_model_uri(candidate)
    raise SpecError(
        "spec.model.fromRun",
        f"run {name!r} is not in the given files nor in {folder}/",
        "pass its file too",
    )
