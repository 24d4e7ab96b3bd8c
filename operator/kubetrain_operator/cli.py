"""`kubetrain`: validate, render and run TrainingRuns; print the CRD.

    kubetrain validate examples/*.yaml                  # builds each plan too: what render refuses
    kubetrain render examples/tulu-dpo.yaml -n ml | kubectl apply -f -
    kubetrain render -f - -o json < run.yaml            # `-` (or -f -) reads stdin
    kubetrain crd | kubectl apply -f -
    kubetrain fit examples/tulu-sft.yaml --model-config examples/models/llama-3.1-8b.json
    kubetrain run examples/tinystories-cpu.yaml         # the whole plan locally (trainer extra)
    kubetrain operator [--namespace NS]                 # the operator (operator extra: Kopf)

Exit codes (documented in docs/cli.md; 2 stays argparse's usage error):
    0 done · 1 invalid input (a TrainingRun, or data a stage refused) · 2 usage error ·
    3 unhealthy training (NaN/Inf loss, a failed sanity rung, perplexity above maxPerplexity) ·
    4 a stage failed otherwise (see its log; running again resumes) ·
    143 stopped by Ctrl-C after a checkpoint (running again resumes).

Problems go to stderr, one per line: `FILE: field.path: problem — what to do`; objects to stdout.
validate, render and crd import neither torch nor the Kubernetes client: they stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetrain_contract import memory
from kubetrain_operator import __version__, fit
from kubetrain_operator import exit_codes as codes
from kubetrain_operator.api import SpecError, SpecErrors, TrainingRun
from kubetrain_operator.cluster_defaults import NO_DEFAULTS, ClusterDefaults
from kubetrain_operator.documents import (
    STDIN,
    Loaded,
    ModelConfigError,
    load_runs,
    local_model_dir,
    read_model_shape,
    resolve_upstream,
)
from kubetrain_operator.plan import Plan, Target, plan_run
from kubetrain_operator.render import render_all

EXIT_OK, EXIT_INVALID, EXIT_USAGE = codes.OK, codes.INVALID, codes.USAGE


def problem(file: Path, text: object) -> None:
    """One problem line on stderr."""
    print(f"{file}: {text}", file=sys.stderr)


def _files(args: argparse.Namespace) -> list[Path]:
    files = [*args.files, *args.filename]
    if not files:
        raise SystemExit(_usage(args, "give at least one FILE (or - / -f - for stdin)"))
    if files.count(STDIN) > 1:
        raise SystemExit(_usage(args, "stdin (-) can be read once"))
    return files


def _usage(args: argparse.Namespace, message: str) -> int:
    args.parser.print_usage(sys.stderr)
    print(f"{args.parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def plan_document(
    item: Loaded,
    loaded: list[Loaded],
    target: Target,
    defaults: ClusterDefaults = NO_DEFAULTS,
    *,
    model_shape: memory.ModelShape | None = None,
    check_fit: bool = True,
) -> Plan | None:
    """The item's plan for a target, or None after printing why there is none."""
    for text in item.problems:
        problem(item.file, text)
    if item.run is None:
        return None
    try:
        upstream = resolve_upstream(item.run, item.file, loaded)
        return plan_run(
            item.run,
            target=target,
            upstream_model=upstream,
            defaults=defaults,
            model_shape=model_shape,
            check_fit=check_fit,
        )
    except SpecError as error:
        for each in error.errors if isinstance(error, SpecErrors) else [error]:
            problem(item.file, each)
        return None


#: render's flags → ClusterDefaults fields: the operator's settings (settings.CLUSTER_ENV).
DEFAULT_FLAGS = {
    "trainer_image": "--image",
    "trainer_service_account": "--service-account",
    "image_pull_secrets": "--image-pull-secret",
    "metrics_port": "--metrics-port",
    "cache_root": "--cache-root",
    "s3_endpoint": "--s3-endpoint",
    "s3_allow_insecure_endpoint": "--s3-allow-insecure-endpoint",
    "s3_secret_name": "--s3-secret-name",
    "gpu_memory": "--gpu-memory",
}


def _defaults(args: argparse.Namespace) -> ClusterDefaults:
    """The cluster defaults given as flags (render); a bad one is a usage error naming it."""
    from pydantic import ValidationError

    given = {
        name: getattr(args, name)
        for name in DEFAULT_FLAGS
        if getattr(args, name, None) not in (None, [], False)
    }
    if "image_pull_secrets" in given:
        given["image_pull_secrets"] = tuple(given["image_pull_secrets"])
    try:
        return ClusterDefaults(**given)
    except ValidationError as error:
        first = error.errors()[0]
        flag = DEFAULT_FLAGS.get(str(first["loc"][0]) if first["loc"] else "", "a flag")
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SystemExit(_usage(args, f"{flag}: {message}")) from None


@dataclass(frozen=True)
class Planned:
    """A run file's run, its plan, and the model size the plan was given (None: unknown)."""

    file: Path
    run: TrainingRun
    plan: Plan
    shape: memory.ModelShape | None


def _plans(args: argparse.Namespace, *, check_fit: bool = True) -> tuple[list[Planned], bool]:
    loaded = [item for file in _files(args) for item in load_runs(file)]
    defaults = _defaults(args)
    plans, failed = [], False
    for item in loaded:
        try:
            shape = _model_shape(item, args)
        except ModelConfigError as error:
            problem(item.file, error)
            failed = True
            continue
        plan = plan_document(
            item, loaded, args.target, defaults, model_shape=shape, check_fit=check_fit
        )
        if plan is None or item.run is None:
            failed = True
            continue
        plans.append(Planned(item.file, item.run, plan, shape))
    return plans, failed


def _model_shape(item: Loaded, args: argparse.Namespace) -> memory.ModelShape | None:
    """The size of the run's model where this machine can read it: --model-config [RUN=]PATH, or
    the config.json of a local model directory (`kubetrain run`'s). None: the preprocess stage
    sizes it (or the architecture does)."""
    if item.run is None:
        return None
    for entry in getattr(args, "model_config", None) or []:
        name, named, path = entry.partition("=")
        if not named:
            return read_model_shape(Path(entry))
        if name == item.run.name:
            return read_model_shape(Path(path))
    local = local_model_dir(item.run.spec.model.uri, Path.cwd())
    if local is not None and args.target == "local":
        return read_model_shape(local)
    return None


def cmd_validate(args: argparse.Namespace) -> int:
    """Parse every run and build its plan: what render or run would refuse, validate refuses."""
    plans, failed = _plans(args)
    if failed:
        return EXIT_INVALID
    unchecked = [p.run.name for p in plans if _unchecked(p.plan)]
    if unchecked:
        print(
            f"note: no fit check for {', '.join(unchecked)}: no GPU memory is known — set "
            "resources.gpuMemory (e.g. 80Gi), a GPU Feature Discovery label in "
            "resources.nodeSelector, or --gpu-memory (the chart's trainer.gpuMemory)",
            file=sys.stderr,
        )
    where = "a cluster" if args.target == "cluster" else "`kubetrain run`"
    print(f"{len(plans)} TrainingRun(s) valid for {where}", file=sys.stderr)
    return EXIT_OK


def _unchecked(plan: Plan) -> bool:
    """A GPU run whose GPU memory nobody states: the plan wrote no capacity anywhere."""
    gpu_stages = [s for s in plan.stages if s.role != "preprocess" and s.gpus_per_node > 0]
    return bool(gpu_stages) and all(
        s.config["memory"]["gpuMemoryBytes"] is None for s in gpu_stages
    )


def cmd_fit(args: argparse.Namespace) -> int:
    """The memory estimate of every stage and rung; exit 1 when one does not fit."""
    plans, failed = _plans(args, check_fit=False)
    for p in plans:
        report, run = p.plan.fit_report, p.run
        print(f"{run.name}:")
        if report is None:
            print(
                f"  {_unsized(run)} — give it: --model-config {run.name}=PATH (in a cluster, the "
                "preprocess stage reads it and checks)"
            )
            continue
        for line in fit.table(report):
            print(f"  {line}")
        for path, message in report.refusals:
            problem(p.file, f"{path}: {message}")
            failed = True
    return EXIT_INVALID if failed else EXIT_OK


def _unsized(run: TrainingRun) -> str:
    if run.spec.model.architecture is not None:
        return "the vocabulary is the tokenizer's (tokenizer.uri): unknown before preprocessing"
    return f"the model's size is in its config.json ({run.spec.model.uri or 'model.fromRun'})"


def cmd_render(args: argparse.Namespace) -> int:
    plans, failed = _plans(args)
    if failed:
        return EXIT_INVALID
    objects: list[dict[str, Any]] = []
    for p in plans:
        objects += render_all(p.run, p.plan, args.namespace)
    sys.stdout.write(dump(objects, args.output))
    return EXIT_OK


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's JSON) in block style, so they stay readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def dump(objects: list[dict[str, Any]], output: str) -> str:
    """YAML documents, or one JSON `List` (what `kubectl get -o json` prints for many)."""
    if output == "json":
        listing = {"apiVersion": "v1", "kind": "List", "items": objects}
        return json.dumps(listing, indent=2) + "\n"
    return yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False, width=100)


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetrain_operator.crd import build_crd, crd_yaml

    sys.stdout.write(crd_yaml() if args.output == "yaml" else dump([build_crd()], "json"))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from kubetrain_operator.local import run_locally

    return run_locally(args)


def operator_argv(args: argparse.Namespace) -> list[str]:
    """`python -m kopf run --standalone -m kubetrain_operator.main …` (the CLI never imports
    Kopf itself: it stays fast, and import-linter says so)."""
    scope = ["--namespace", args.namespace] if args.namespace else ["--all-namespaces"]
    liveness = ["--liveness", args.liveness] if args.liveness else []
    verbose = ["--verbose"] if args.verbose else []
    return [
        sys.executable,
        "-m",
        "kopf",
        "run",
        "--standalone",
        "-m",
        "kubetrain_operator.main",
        *scope,
        *liveness,
        *verbose,
    ]


def cmd_operator(args: argparse.Namespace) -> int:
    import os

    argv = operator_argv(args)
    os.execv(argv[0], argv)  # noqa: S606 (our own argv, no shell)
    return EXIT_OK  # not reached


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", type=Path, metavar="FILE", help="run files; - is stdin")
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a run file, as kubectl takes it (repeatable; -f - reads stdin)",
    )


def _add_cluster_defaults(p: argparse.ArgumentParser) -> None:
    """The operator's cluster defaults (docs/operator.md): pass the chart's values to render
    exactly what the operator creates. A run's own spec value always wins."""
    group = p.add_argument_group(
        "cluster defaults", "what the operator fills in where the spec is silent (the spec wins)"
    )
    dest = {flag: name for name, flag in DEFAULT_FLAGS.items()}
    helps = {
        "--image": f"trainer image (default {NO_DEFAULTS.trainer_image}; spec.image wins)",
        "--service-account": "ServiceAccount of every stage pod (rendered too; the operator "
        "creates it if absent)",
        "--image-pull-secret": "pull secret of every stage pod (repeatable)",
        "--metrics-port": f"port of the stage pods' /metrics (default {NO_DEFAULTS.metrics_port})",
        "--cache-root": "dataset cache (s3:// or pvc://) where spec.storage.cacheRoot is unset",
        "--s3-endpoint": "S3 endpoint where spec.storage.s3.endpoint is empty",
        "--s3-allow-insecure-endpoint": "allow a plain http:// --s3-endpoint",
        "--s3-secret-name": "S3 Secret where spec.storage.s3.secretName is unset (runs that "
        "use s3:// only)",
        "--gpu-memory": "memory of one GPU (e.g. 80Gi) for the fit check where neither "
        "resources.gpuMemory nor a GPU label of the nodeSelector says it",
    }
    for flag, text in helps.items():
        if flag == "--image-pull-secret":
            group.add_argument(flag, dest=dest[flag], action="append", default=[], help=text)
        elif flag == "--s3-allow-insecure-endpoint":
            group.add_argument(flag, dest=dest[flag], action="store_true", help=text)
        elif flag == "--metrics-port":
            group.add_argument(flag, dest=dest[flag], type=int, default=None, help=text)
        else:
            group.add_argument(flag, dest=dest[flag], default=None, help=text)


def _add_target(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--target", choices=["cluster", "local"], default="cluster", help=text)


def _add_fit_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="[RUN=]PATH",
        help="the model's config.json (or its directory), for runs whose model is not local "
        "(s3://, pvc://, hf://, fromRun); RUN= applies it to one run (repeatable)",
    )
    p.add_argument(
        "--gpu-memory",
        dest="gpu_memory",
        default=None,
        help="memory of one GPU (e.g. 80Gi) where neither resources.gpuMemory nor a GPU label "
        "of the nodeSelector says it (the chart's trainer.gpuMemory)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetrain",
        description="Declarative LLM training on Kubernetes.",
        epilog="exit codes: 0 done, 1 invalid input, 2 usage error, 3 unhealthy training, "
        "4 a stage failed, 143 stopped after a checkpoint",
    )
    parser.add_argument("--version", action="version", version=f"kubetrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "validate", help="check TrainingRun files and build their plans; exit 1 on any problem"
    )
    _add_files(p)
    _add_target(p, "validate for a cluster (render, the operator) or for `kubetrain run`")
    _add_fit_inputs(p)
    p.set_defaults(func=cmd_validate, parser=p)
    p = sub.add_parser(
        "fit", help="print each stage's and rung's memory per GPU; exit 1 when one does not fit"
    )
    _add_files(p)
    _add_target(p, "plan for a cluster or for `kubetrain run` (local model directories are read)")
    _add_fit_inputs(p)
    p.set_defaults(func=cmd_fit, parser=p)
    p = sub.add_parser("render", help="print every Kubernetes object of every stage")
    _add_files(p)
    p.add_argument(
        "-n",
        "--namespace",
        default=None,
        help="set metadata.namespace (default: none, so kubectl apply -n NS works)",
    )
    _add_cluster_defaults(p)
    _add_output(p)
    p.set_defaults(func=cmd_render, parser=p, target="cluster")
    p = sub.add_parser("crd", help="print the TrainingRun CustomResourceDefinition")
    _add_output(p)
    p.set_defaults(func=cmd_crd, parser=p)
    p = sub.add_parser(
        "run", help="run the whole plan locally: preprocess → sanity rungs → train → merge"
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the run file; - is stdin")
    p.add_argument("--workdir", type=Path, default=None, help="default: runs/<name>")
    p.add_argument("--nproc", type=int, default=None, help="processes for training (torchrun)")
    p.add_argument(
        "--stage",
        default=None,
        metavar="STAGE",
        help="run only this stage: preprocess, sanity-<i>, train or merge",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default: spec)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve each stage's Prometheus metrics here (default: a free port)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every stage log line in a terminal too (they are always in the stage's log)",
    )
    p.set_defaults(func=cmd_run, parser=p)
    p = sub.add_parser(
        "operator", help="run the operator (Kopf) against the kubeconfig or in-cluster config"
    )
    p.add_argument("-n", "--namespace", default=None, help="watch one namespace (default: all)")
    p.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="Kopf's liveness endpoint ('' to disable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Kopf's debug log")
    p.set_defaults(func=cmd_operator, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
