"""`kubetrain`: validate, render and run TrainingRuns; print the CRD.

    kubetrain validate examples/*.yaml          # exit 0 when all are valid, 2 otherwise
    kubetrain render examples/tulu-dpo.yaml -n ml   # every object of every stage, as YAML
    kubetrain crd | kubectl apply -f -
    kubetrain run examples/tinystories-cpu.yaml # the whole plan locally (needs the trainer extra)

validate, render and crd import neither torch nor the Kubernetes client: they stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetrain_operator.api import KIND, InvalidRun, Problem, SpecError, TrainingRun, parse_run
from kubetrain_operator.plan import plan_run, upstream_model_uri
from kubetrain_operator.render import DEFAULT_IMAGE, render_all

EXIT_INVALID = 2


@dataclass(frozen=True)
class Loaded:
    """A TrainingRun document read from a file, or the problems that stopped it."""

    file: Path
    run: TrainingRun | None
    problems: tuple[Problem, ...] = ()


def load_runs(path: Path) -> Iterator[Loaded]:
    """Every TrainingRun in a (multi-document) YAML file; other kinds are reported."""
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except OSError as error:
        problem = f"cannot read: {error.strerror} — check the path"
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
    if not any(r.name == name for r in candidates):
        for sibling in sorted(file.parent.glob("*.y*ml")):
            if sibling.resolve() != file.resolve():
                candidates += [o.run for o in load_runs(sibling) if o.run is not None]
    for candidate in candidates:
        if candidate.name == name:
            return upstream_model_uri(candidate)
    raise SpecError(
        "spec.model.fromRun",
        f"run {name!r} is not in the given files nor in {file.parent}/",
        "pass its file too",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for file in args.files:
        for loaded in load_runs(file):
            for problem in loaded.problems:
                print(f"{file}: {problem}")
            bad += bool(loaded.problems)
    if not bad:
        print(f"{len(args.files)} file(s) valid", file=sys.stderr)
    return EXIT_INVALID if bad else 0


def cmd_render(args: argparse.Namespace) -> int:
    loaded = [item for file in args.files for item in load_runs(file)]
    objects: list[dict[str, Any]] = []
    failed = False
    for item in loaded:
        for problem in item.problems:
            print(f"{item.file}: {problem}", file=sys.stderr)
            failed = True
        if item.run is None:
            continue
        try:
            plan = plan_run(item.run, upstream_model=resolve_upstream(item.run, item.file, loaded))
        except SpecError as error:
            print(f"{item.file}: {error}", file=sys.stderr)
            failed = True
            continue
        objects += render_all(item.run, plan, namespace=args.namespace, image=args.image)
    if failed:
        return EXIT_INVALID
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, width=100))
    return 0


def cmd_crd(_: argparse.Namespace) -> int:
    from kubetrain_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kubetrain_operator.local import run_locally

    return run_locally(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetrain", description="Declarative LLM training on Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check TrainingRun files; exit 2 on any problem")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("render", help="print every Kubernetes object of every stage as YAML")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="trainer image (spec.image wins)")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("crd", help="print the TrainingRun CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)
    p = sub.add_parser(
        "run", help="run the whole plan locally: preprocess → sanity → train → merge"
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--workdir", type=Path, default=None, help="default: runs/<name>")
    p.add_argument("--nproc", type=int, default=None, help="processes for training (torchrun)")
    p.add_argument(
        "--stage",
        choices=["preprocess", "sanity", "train", "merge"],
        default=None,
        help="run only this stage",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default: spec)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve each stage's Prometheus metrics here (default: a free port)",
    )
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
