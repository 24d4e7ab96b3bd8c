"""`kubetrain run`: the same stages as the cluster, as local subprocesses.

Each stage gets its config file and runs `python -m kubetrain_trainer …` (training under
`torchrun --standalone`), exactly the stage contract the pods use. Progress comes from the stage's
own Prometheus endpoint — the series the operator polls — so what you see locally is what the
dashboard shows in a cluster. Ctrl-C sends SIGTERM: the trainer checkpoints and exits 143; running
the same command again resumes. The executor only consumes the plan (`plan_run(target="local")`):
stage shape, environment and configs are the plan's. The sanity ladder runs rung by rung, each
rung's result kept as `result-sanity-<i>.json`; a failing rung stops the run before the next.

In a terminal the bars already show step, loss and ETA, so the stages' INFO lines (a step line
per logging interval) go only to each stage's log file; warnings, errors and anything else still
show. `--verbose`, or output that is not a terminal, shows every line as before. The run ends
with the figures a user looks for first, read from the stage results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kubetrain_contract import memory, metrics
from kubetrain_contract.durations import format_duration
from kubetrain_contract.memory import gib
from kubetrain_operator import exit_codes as codes
from kubetrain_operator.api import SpecError, TrainingRun
from kubetrain_operator.documents import (
    ModelConfigError,
    load_runs,
    local_model_dir,
    read_model_shape,
    resolve_upstream,
)
from kubetrain_operator.plan import Plan, Stage, plan_run, stage_config_json

console = Console(stderr=True, highlight=False, soft_wrap=True)

#: A stage's INFO or DEBUG record in the trainer's text log format (kubetrain_trainer.stage:
#: "%(asctime)s %(levelname)s %(name)s: %(message)s"): kept out of a terminal unless --verbose.
ROUTINE_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?:DEBUG|INFO) ")


@dataclass(frozen=True)
class LocalStage:
    """A planned stage bound to this machine: its config file, log and result files."""

    stage: Stage
    config_file: Path
    log_file: Path

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def metrics_port(self) -> int:
        return self.stage.metrics_port

    @property
    def trainer_result(self) -> str:
        """The name the trainer writes its result under (`result-<config stage>.json`)."""
        return str(self.stage.config["stage"])

    def argv(self, workdir: Path) -> list[str]:
        args = self.stage.trainer_args(str(self.config_file), str(workdir))
        if not self.stage.distributed:
            return [sys.executable, *args]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={self.stage.procs_per_node}",
            *args,
        ]


def _local_model_shape(run: TrainingRun) -> memory.ModelShape | None:
    """The size of a model directory on this machine, so the plan checks the fit before any
    stage runs; None when there is none to read (the stages say what is wrong with it)."""
    local = local_model_dir(run.spec.model.uri, Path.cwd())
    if local is None:
        return None
    try:
        return read_model_shape(local)
    except ModelConfigError:
        return None


def run_locally(args: argparse.Namespace) -> int:
    """Entry point of `kubetrain run` (argparse namespace from cli.py); returns a CLI exit code."""
    loaded = list(load_runs(args.file))
    problems = [f"{item.file}: {p}" for item in loaded for p in item.problems]
    runs = [item.run for item in loaded if item.run is not None]
    if problems or len(runs) != 1:
        for line in problems or [f"{args.file}: expected exactly one TrainingRun"]:
            console.print(line, markup=False)
        return codes.INVALID
    run = runs[0]
    try:
        plan = plan_run(
            run,
            target="local",
            upstream_model=resolve_upstream(run, args.file, loaded),
            base_dir=os.getcwd(),
            cache_root=str(args.cache_dir.resolve()) if args.cache_dir else None,
            metrics_port=args.metrics_port or _free_port(),
            local_procs=args.nproc,
            model_shape=_local_model_shape(run),
        )
    except SpecError as error:
        console.print(f"{args.file}: {error}", markup=False)
        return codes.INVALID
    workdir = (args.workdir or Path("runs") / run.name).resolve()
    stages = bind_stages(plan, workdir)
    if args.stage is not None:
        stages = [s for s in stages if s.name == args.stage]
        if not stages:
            names = ", ".join(s.name for s in plan.stages)
            console.print(f"--stage {args.stage}: not a stage of this run — use one of {names}")
            return codes.USAGE
    console.print(f"[bold]{run.name}[/]: {' → '.join(s.name for s in stages)} in {workdir}")
    echo_all = args.verbose or not console.is_terminal
    walls: dict[str, float | None] = {}
    for local in stages:
        console.print(f"{local.name}: {local.stage.summary}", markup=False)
        if local.stage.role == "sanity" and _already_passed(local, workdir):
            console.print(f"{local.name}: passed before with the same config — skipped")
            walls[local.name] = None
            continue
        started = time.monotonic()
        code = run_stage(local, workdir, echo_all=echo_all)
        walls[local.name] = time.monotonic() - started
        if code != 0:
            _explain_failure(local, code, workdir)
            return codes.from_stage(code)
        _say_if_complete(local, workdir)
        if local.stage.role == "preprocess":
            for line in source_table(_result(workdir, local.name).get("sources")):
                console.print(line, markup=False, highlight=False)
        if local.stage.role == "sanity":
            _passed_marker(workdir, local).write_text(_sha256(local.config_file), encoding="utf-8")
    _print_summary(plan, workdir, walls)
    return codes.OK


def bind_stages(plan: Plan, workdir: Path) -> list[LocalStage]:
    """Write each stage's config under <workdir>/configs (rewritten only when it changed)."""
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    bound = []
    for stage in plan.stages:
        config_file = workdir / "configs" / stage.config_file
        new_text = stage_config_json(stage)
        if not config_file.exists() or config_file.read_text(encoding="utf-8") != new_text:
            config_file.write_text(new_text, encoding="utf-8")
        bound.append(LocalStage(stage, config_file, workdir / "logs" / f"{stage.name}.log"))
    return bound


def _stage_env(stage: Stage) -> dict[str, str]:
    """The caller's environment plus the plan's values (the caller's own settings win)."""
    env = dict(os.environ)
    for entry in stage.env:
        if "value" in entry:
            env.setdefault(str(entry["name"]), str(entry["value"]))
    if stage.gpus_per_node == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return env


def run_stage(local: LocalStage, workdir: Path, *, echo_all: bool = True) -> int:
    """Run one stage to completion: stream its log, show progress, forward Ctrl-C as SIGTERM.
    Every line goes to the stage's log file; `echo_all` False keeps routine ones off the screen."""
    env = _stage_env(local.stage)
    name, result = local.name, local.trainer_result
    (workdir / f"result-{result}.json").unlink(missing_ok=True)  # never read a previous run's
    (workdir / f"result-{name}.json").unlink(missing_ok=True)
    with local.log_file.open("a", encoding="utf-8") as log, _progress(name) as progress:
        task = progress.add_task(name, total=None, detail="starting", total_steps="?", amount="")
        proc = subprocess.Popen(
            [*DIE_WITH_LAUNCHER, str(os.getpid()), *local.argv(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        reader = threading.Thread(
            target=_pump, args=(proc.stdout, log, progress, echo_all), daemon=True
        )
        reader.start()
        progress.console.print(f"{name}: metrics at http://127.0.0.1:{local.metrics_port}/metrics")
        interrupted = False
        while proc.poll() is None:
            try:
                _update(progress, task, local)
                time.sleep(0.5)
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: stop now
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    interrupted = True
                    progress.console.print(
                        f"{name}: stopping — saving a checkpoint (Ctrl-C again to kill)"
                    )
                    os.killpg(proc.pid, signal.SIGTERM)
        reader.join(timeout=5)
        _keep_result(workdir, result, name)
        _update(progress, task, local, final=True, workdir=workdir)
    if proc.returncode == 0:
        return 0
    # torchrun reports any worker failure as 1: the stage's own code is in its result.
    code = _result(workdir, name).get("exitCode")
    if interrupted:
        return codes.TERMINATED
    return code if isinstance(code, int) else proc.returncode


def _keep_result(workdir: Path, written: str, name: str) -> None:
    """Every sanity rung writes result-sanity.json: keep each rung's as result-sanity-<i>.json."""
    if written != name and (workdir / f"result-{written}.json").exists():
        (workdir / f"result-{written}.json").replace(workdir / f"result-{name}.json")


def _progress(name: str) -> Progress:
    """Bytes read of the input for preprocessing, steps for training, elapsed time for merge."""
    unit = {"preprocess": "{task.fields[amount]}", "merge": ""}.get(
        name, "{task.completed:>6.0f}/{task.fields[total_steps]}"
    )
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _pump(stream: IO[str], log: IO[str], progress: Progress, echo_all: bool) -> None:
    """Copy the child's output to its log file and to the console, above the progress bar
    (routine lines only when `echo_all`)."""
    for line in stream:
        log.write(line)
        log.flush()
        if echo_all or not ROUTINE_LINE.match(line):
            progress.console.print(line.rstrip("\n"), markup=False, highlight=False)


def _update(
    progress: Progress,
    task: TaskID,
    local: LocalStage,
    *,
    final: bool = False,
    workdir: Path | None = None,
) -> None:
    """Read the stage's metrics endpoint (or, at the end, its result file) into the bar."""
    name, port = local.name, local.metrics_port
    if final and workdir is not None:
        result = _result(workdir, name)
        if result.get("ok"):
            state = next(t for t in progress.tasks if t.id == task)
            done = state.total or 1
            hit = " (cache hit)" if result.get("cacheHit") else ""
            progress.update(task, completed=done, total=done, detail=f"[green]done{hit}")
        return
    samples = scrape(port)
    if not samples:
        return
    if local.stage.role == "preprocess":
        read = samples.get(metrics.PREPROCESS_READ_BYTES, 0.0)
        size = samples.get(metrics.PREPROCESS_INPUT_BYTES)
        tokens = samples.get(metrics.PREPROCESS_TOKENS, 0.0)
        progress.update(task, completed=read, total=size or None, amount=read_of(read, size))
        left = next(t for t in progress.tasks if t.id == task).time_remaining
        until = f"  ETA {format_duration(left)}" if left is not None and read else ""
        progress.update(task, detail=f"{tokens:,.0f} tokens{until}")
        return
    step, total = samples.get(metrics.TRAIN_STEP), samples.get(metrics.TRAIN_TOTAL_STEPS)
    loss, eta = samples.get(metrics.TRAIN_LOSS), samples.get(metrics.TRAIN_ETA)
    detail = "" if loss is None else f"loss {loss:.4f}"
    if eta is not None:
        detail += f"  ETA {format_duration(eta)}"
    total_steps = int(total) if total else None
    progress.update(
        task, completed=step or 0, total=total_steps, detail=detail, total_steps=total_steps or "?"
    )


def read_of(read: float, size: float | None) -> str:
    """`12.3/56.0 MB` of the input read (the total once the stage knows it)."""
    return f"{read / 1e6:.1f}/{size / 1e6:.1f} MB" if size else f"{read / 1e6:.1f} MB"


#: Runs a stage so that the kernel SIGKILLs it when this launcher dies (a closed terminal, the
#: OOM killer): `prctl(PR_SET_PDEATHSIG)`, kept across exec, then exec of the stage's argv (no
#: preexec_fn: it is unsafe with the progress bar's thread running). If the launcher died
#: already (the parent pid changed), the stage does not start. torchrun's own workers are the
#: trainer's business: each stage process does the same for itself (kubetrain_trainer.lifetime).
DIE_WITH_LAUNCHER = [
    sys.executable,
    "-c",
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])",
]


def scrape(port: int) -> dict[str, float]:
    """Sample values by series name (labels dropped: one run, one rank-0 exporter)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _result(workdir: Path, stage: str) -> dict[str, Any]:
    try:
        data = json.loads((workdir / f"result-{stage}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _passed_marker(workdir: Path, local: LocalStage) -> Path:
    return workdir / f"{local.name}-passed.sha256"


def _already_passed(local: LocalStage, workdir: Path) -> bool:
    """A sanity rung that passed with this exact config need not run again on a re-run."""
    marker = _passed_marker(workdir, local)
    return marker.exists() and marker.read_text(encoding="utf-8") == _sha256(local.config_file)


def _sha256(path: Path) -> str:
    """Of the config minus its metrics port, which is picked afresh on every run."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("metricsPort", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _explain_failure(local: LocalStage, code: int, workdir: Path) -> None:
    result = _result(workdir, local.stage.name)
    meaning = {
        2: "invalid config or input data — fix it, retrying will not help",
        3: "unhealthy training (NaN/Inf loss, divergence, a failed sanity rung or perplexity)",
        143: "stopped; a checkpoint was saved — run the same command to resume",
    }.get(code, "unexpected failure — see the log; running the same command again resumes")
    console.print(f"[red]{local.stage.name} failed (exit {code})[/]: {meaning}")
    if result.get("error"):
        console.print(str(result["error"]), markup=False)
    console.print(f"log: {local.log_file}")


def _say_if_complete(local: LocalStage, workdir: Path) -> None:
    """A re-run that resumed at the last step trained nothing: say so plainly."""
    result = _result(workdir, local.name)
    step = result.get("step")
    if step is not None and result.get("resumedFrom") == step:
        console.print(f"{local.name}: complete at step {step} — nothing left to train")


def _print_summary(plan: Plan, workdir: Path, walls: dict[str, float | None]) -> None:
    """The headline figures from the stage results, wall time per stage, then where things are."""
    figures = headline({name: _result(workdir, name) for name in walls})
    console.print("[bold green]done[/]" + (f": {figures}" if figures else ""))
    width = max(len(name) for name in walls)
    for name, wall in walls.items():
        took = "skipped" if wall is None else format_duration(wall)
        result = _result(workdir, name)
        cached = " (cache hit)" if result.get("cacheHit") else ""
        figures = measured(result) if wall is not None else ""
        console.print(
            f"  {name:<{width}}  {took:>7}{cached}" + (f"  {figures}" if figures else ""),
            markup=False,
        )
    console.print(f"  output:  {plan.output_uri}")
    for name in ("final", "merged"):
        path = Path(plan.output_uri) / name
        if path.exists():
            console.print(f"  {name + ':':<8} {path}")
    console.print(f"  dataset: {plan.dataset_pointer}")
    rungs = ", ".join(f"result-{s.name}.json" for s in plan.sanity_stages)
    console.print(f"  results: {workdir}/result-*.json, logs: {workdir}/logs/")
    if rungs:
        console.print(f"  sanity:  {rungs}")


def headline(results: dict[str, dict[str, Any]]) -> str:
    """`loss 6.1034 → 0.7012, validation perplexity 2.013, 5,432 tokens/s`: what this run's
    stage results hold (training's losses and speed, the merge stage's perplexity)."""
    parts = []
    train, merge = results.get("train", {}), results.get("merge", {})
    first, last = train.get("firstLoss"), train.get("loss")
    if isinstance(first, float) and isinstance(last, float):
        parts.append(f"loss {first:.4f} → {last:.4f}")
    perplexity = merge.get("perplexity")
    if perplexity is None and isinstance(train.get("evalLoss"), float):
        perplexity = math.exp(train["evalLoss"])
    if isinstance(perplexity, float):
        parts.append(f"validation perplexity {perplexity:.3f}")
    speed = train.get("tokensPerSecond")
    if isinstance(speed, float):
        parts.append(f"{speed:,.0f} tokens/s")
    return ", ".join(parts)


#: Columns of the per-source table: heading and the result's key (rejected: summed over reasons).
SOURCE_COLUMNS = (
    ("files", "files"),
    ("read", "rowsRead"),
    ("accepted", "accepted"),
    ("rejected", "rejected"),
    ("selected", "selected"),
    ("tokens", "tokens"),
)


def source_table(sources: Any) -> list[str]:
    """The preprocess result's per-source accounting as a table: one line per source, a total
    line under several, the reasons of the rejects after the counts; [] without sources."""
    rows = [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []
    if not rows:
        return []
    lines = [
        (str(r.get("name", "?")), str(r.get("split", "?")), _source_figures(r), _rejected(r))
        for r in rows
    ]
    if len(rows) > 1:
        total: dict[str, int] = {}
        for *_, rejected in lines:
            for reason, n in rejected.items():
                total[reason] = total.get(reason, 0) + n
        sums = [sum(column) for column in zip(*(f for _, _, f, _ in lines), strict=True)]
        lines.append(("all", "", sums, total))
    cells = [["source", "split", *(name for name, _ in SOURCE_COLUMNS), ""]]
    cells += [[a, b, *(f"{n:,}" for n in figures), _reasons(r)] for a, b, figures, r in lines]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]) - 1)]
    return [
        "  "
        + "  ".join(
            [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
            + [line[i].rjust(widths[i]) for i in range(2, len(widths))]
            + [line[-1]]
        ).rstrip()
        for line in cells
    ]


def _source_figures(row: dict[str, Any]) -> list[int]:
    """One source's counts in SOURCE_COLUMNS order (0 for one missing or not a count)."""
    figures = []
    for _, key in SOURCE_COLUMNS:
        value = sum(_rejected(row).values()) if key == "rejected" else row.get(key)
        figures.append(value if isinstance(value, int) and not isinstance(value, bool) else 0)
    return figures


def _rejected(row: dict[str, Any]) -> dict[str, int]:
    rejected = row.get("rejected")
    items = rejected.items() if isinstance(rejected, dict) else []
    return {str(k): v for k, v in items if isinstance(v, int) and not isinstance(v, bool)}


def _reasons(rejected: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(rejected.items()) if n)


def measured(result: dict[str, Any]) -> str:
    """`peak 61.3 GiB of the GPU's 80.0 GiB, estimate 58.9 GiB, 5,432 tokens/s`: a train or
    sanity stage's measured peak memory (GPU allocated, or the process's RSS on CPU) beside the
    memory model's estimate, and its throughput."""
    parts = []
    allocated, rss = result.get("memoryPeakAllocatedBytes"), result.get("memoryPeakRssBytes")
    device, estimate = result.get("deviceMemoryBytes"), result.get("memoryEstimateBytes")
    if isinstance(allocated, int):
        of = f" of the GPU's {gib(device)}" if isinstance(device, int) else " GPU"
        parts.append(f"peak {gib(allocated)}{of}")
    elif isinstance(rss, int):
        parts.append(f"peak {gib(rss)} RSS")
    if parts and isinstance(estimate, int):
        parts.append(f"estimate {gib(estimate)}")
    speed = result.get("tokensPerSecond")
    if isinstance(speed, float):
        parts.append(f"{speed:,.0f} tokens/s")
    return ", ".join(parts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
