"""Run files: read TrainingRun documents (a file, or `-` for stdin) and resolve `fromRun` chains.

Shared by the CLI's validate/render and by `kubetrain run`; it knows files and YAML, nothing of
how a run is executed. A problem is reported per file and line, never raised past the caller.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetrain_contract import memory
from kubetrain_operator.api import KIND, InvalidRun, Problem, SpecError, TrainingRun, parse_run
from kubetrain_operator.plan import upstream_model_uri

STDIN = Path("-")


@dataclass(frozen=True)
class Loaded:
    """A TrainingRun document read from a file, or the problems that stopped it."""

    file: Path
    run: TrainingRun | None
    problems: tuple[Problem, ...] = ()


#: Deepest nesting of mappings and lists a run file may have (a TrainingRun needs about 8):
#: deeper input is refused with a line before the parser's recursion could overflow the stack.
MAX_DEPTH = 64


class RunFileError(yaml.MarkedYAMLError):
    """A run file YAML allows but a TrainingRun does not: a repeated key, too deep a nesting;
    `problem` says what to do, `problem_mark` where."""


class _RunLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping, as kubectl does (PyYAML
    keeps the last one silently), and nesting deeper than MAX_DEPTH (a RecursionError otherwise)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise RunFileError(
                    problem=f"nested too deeply (more than {MAX_DEPTH} levels) — a TrainingRun "
                    "needs a few; check the brackets",
                    problem_mark=mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges: the keys it brings may be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise RunFileError(
                    problem=f"duplicate key {key!r} (first on line {first}) — keep one: YAML "
                    "keys are unique, and kubectl refuses the file",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read(path: Path) -> str:
    if path == STDIN:
        return sys.stdin.read()
    return path.read_text(encoding="utf-8")


def load_runs(path: Path) -> Iterator[Loaded]:
    """Every TrainingRun in a (multi-document) YAML file, or stdin for `-`; other kinds are
    reported."""
    try:
        documents = list(yaml.load_all(_read(path), Loader=_RunLoader))
    except OSError as error:
        problem = f"cannot read: {error.strerror} — check the path"
        yield Loaded(path, None, (Problem("(file)", problem),))
        return
    except UnicodeDecodeError:
        problem = "is not UTF-8 text — pass a YAML file"
        yield Loaded(path, None, (Problem("(file)", problem),))
        return
    except RunFileError as error:
        where = f"line {error.problem_mark.line + 1}" if error.problem_mark else "(file)"
        yield Loaded(path, None, (Problem(where, str(error.problem)),))
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


#: A config.json is a few kilobytes; anything larger is not one.
MAX_MODEL_CONFIG_BYTES = 1024 * 1024


class ModelConfigError(ValueError):
    """A model config.json that cannot size the model: names the file and what to do."""


def read_model_shape(path: Path) -> memory.ModelShape:
    """The shape of the model whose config.json is `path` (or a directory holding one)."""
    if path.is_dir():
        path = path / "config.json"
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MODEL_CONFIG_BYTES + 1)
    except OSError as error:
        raise ModelConfigError(
            f"{path}: cannot read the model's config.json ({error.strerror}) — point at the "
            "model directory or its config.json"
        ) from None
    if len(raw) > MAX_MODEL_CONFIG_BYTES:
        raise ModelConfigError(f"{path}: over 1 MiB: not a model config.json — check the path")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelConfigError(
            f"{path}: not JSON ({error}) — give the model's config.json"
        ) from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object — give the model's config.json")
    try:
        return memory.ModelShape.from_hf_config(data, str(path))
    except memory.ShapeError as error:
        raise ModelConfigError(str(error)) from None


def local_model_dir(uri: str | None, base_dir: Path) -> Path | None:
    """The directory of a model.uri on this machine (a path or file://), else None."""
    if uri is None or "://" in uri.removeprefix("file://"):
        return None
    local = Path(uri.removeprefix("file://"))
    return local if local.is_absolute() else base_dir / local
