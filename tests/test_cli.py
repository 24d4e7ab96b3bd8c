"""The `kubetrain` CLI: `validate` and `render`, run as real subprocesses on real files.

Real: the installed `kubetrain` console script (or `python -m kubetrain_operator.cli` where the
script is missing), the shipped examples, files written to a temporary directory, exit codes and
the text on stdout/stderr; the import check runs a fresh interpreter. Nothing is emulated.
Expected output is derived from the issue's contract (`FILE: spec.path: problem — what to do`, exit
0/2) and from the example documents themselves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from runspecs import EXAMPLE_FILES, ROOT, changed, example

SCRIPT = shutil.which("kubetrain", path=str(Path(sys.executable).parent))
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "kubetrain_operator.cli"]
LINE = re.compile(r"^(?P<file>[^:]+): (?P<path>[^: ]+|line \d+): (?P<problem>.+) — (?P<fix>.+)$")


def kubetrain(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def write(path: Path, *documents: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return path


def problem_lines(output: str, file: Path) -> list[re.Match[str]]:
    lines = output.strip().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), f"lines not of the form FILE: path: problem — fix:\n{output}"
    assert {m["file"] for m in matches if m} == {str(file)}
    return [m for m in matches if m]


# ------------------------------------------------------------------------------------ validate


def test_validate_accepts_every_example() -> None:
    proc = kubetrain("validate", *(p.relative_to(ROOT) for p in EXAMPLE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


FIELD_PROBLEMS = {
    "metadata.name": {"metadata.name": "Bad_Name"},
    "spec.training.microBatchSize": {"spec.training.microBatchSize": 0},
    "spec.data.blockSize": {"spec.data.blockSize": "large"},
    "spec.resources.gpuResource": {"spec.resources.gpuResource": "GPU!"},
    "spec.output.uri": {"spec.output.uri": "ftp://runs/x"},
    "spec.optimiser": {"spec.optimiser": "adamw_torch"},
    "spec.distributed.zeroStage": {"spec.distributed.zeroStage": 4},
}


def test_validate_prints_one_line_per_problem(tmp_path: Path) -> None:
    doc = example("tulu-sft")
    for change in FIELD_PROBLEMS.values():
        doc = changed(doc, change)
    bad = write(tmp_path / "bad.yaml", doc)
    proc = kubetrain("validate", bad)
    assert proc.returncode == 2
    lines = problem_lines(proc.stdout, bad)
    assert sorted(m["path"] for m in lines) == sorted(FIELD_PROBLEMS)


def test_validate_reports_cross_field_problems_together(tmp_path: Path) -> None:
    # api.md rules: fp16 needs a GPU; output.merge needs an adapter.
    doc = changed(
        example("tinystories-cpu"),
        {"spec.training.precision": "fp16", "spec.output.merge": True},
    )
    bad = write(tmp_path / "cross.yaml", doc)
    proc = kubetrain("validate", bad)
    assert proc.returncode == 2
    paths = [m["path"] for m in problem_lines(proc.stdout, bad)]
    assert sorted(paths) == ["spec.output.merge", "spec.training.precision"]


def test_validate_checks_every_file_and_names_the_bad_one(tmp_path: Path) -> None:
    good = EXAMPLE_FILES[0]
    bad = write(tmp_path / "bad.yaml", changed(example("tulu-sft"), {"spec.maxRestarts": -1}))
    proc = kubetrain("validate", good, bad)
    assert proc.returncode == 2
    (line,) = problem_lines(proc.stdout, bad)
    assert line["path"] == "spec.maxRestarts"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """\
        apiVersion: kubetrain.dev/v1alpha1
        kind: TrainingRun
        metadata:
          name: broken
        spec:
          model: uri: s3://models/x
          data: {format: text, train: s3://d/x.txt}
        """
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text(text, encoding="utf-8")
    proc = kubetrain("validate", broken)
    assert proc.returncode == 2
    (line,) = problem_lines(proc.stdout, broken)
    assert line["path"] == "line 6"  # the `model: uri:` line
    assert "Traceback" not in proc.stderr


def test_other_kinds_are_reported(tmp_path: Path) -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    mixed = write(tmp_path / "mixed.yaml", config_map, example("tulu-sft"))
    proc = kubetrain("validate", mixed)
    assert proc.returncode == 2
    (line,) = problem_lines(proc.stdout, mixed)
    assert line["path"] == "kind" and "ConfigMap" in line["problem"]


@pytest.mark.parametrize("case", ["empty", "missing", "a list"])
def test_unusable_files_are_reported_not_crashed_on(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case.replace(' ', '-')}.yaml"
    if case == "empty":
        path.write_text("", encoding="utf-8")
    elif case == "a list":
        path.write_text("- 1\n- 2\n", encoding="utf-8")
    proc = kubetrain("validate", path)
    assert proc.returncode == 2
    assert len(problem_lines(proc.stdout, path)) == 1
    assert "Traceback" not in proc.stderr


# -------------------------------------------------------------------------------------- render


def test_render_the_dpo_chain_into_a_namespace() -> None:
    proc = kubetrain("render", "examples/tulu-dpo.yaml", "-n", "ml")
    assert proc.returncode == 0, proc.stderr
    objects = list(yaml.safe_load_all(proc.stdout))
    kinds = [(o["kind"], o["metadata"]["labels"].get("kubetrain.dev/stage")) for o in objects]
    assert kinds == [
        ("ConfigMap", None),
        ("Service", None),
        ("Job", "preprocess"),
        ("PyTorchJob", "sanity"),
        ("PyTorchJob", "train"),
        ("Job", "merge"),
    ]
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}
    dpo, sft = example("tulu-dpo"), example("tulu-sft")
    assert {o["metadata"]["labels"]["kubetrain.dev/run"] for o in objects} == {
        dpo["metadata"]["name"]
    }
    # model.fromRun: llama31-tulu-sft is a full fine-tune, so its model is <output>/final.
    assert dpo["spec"]["model"]["fromRun"] == sft["metadata"]["name"]
    expected = sft["spec"]["output"]["uri"].rstrip("/") + "/final"
    configs = {k: json.loads(v) for k, v in objects[0]["data"].items()}
    for name in ("sanity.json", "train.json", "merge.json"):
        assert configs[name]["model"]["uri"] == expected
        assert configs[name]["method"] == "dpo"


def test_render_default_namespace_and_both_runs_of_a_chain() -> None:
    proc = kubetrain("render", "examples/tulu-sft.yaml", "examples/tulu-dpo.yaml")
    assert proc.returncode == 0, proc.stderr
    objects = list(yaml.safe_load_all(proc.stdout))
    assert len(objects) == 12
    assert {o["metadata"]["namespace"] for o in objects} == {"default"}
    runs = [o["metadata"]["labels"]["kubetrain.dev/run"] for o in objects]
    assert runs == ["llama31-tulu-sft"] * 6 + ["llama31-tulu-dpo"] * 6


def test_render_refuses_a_chain_without_its_upstream(tmp_path: Path) -> None:
    alone = write(tmp_path / "dpo.yaml", example("tulu-dpo"))
    proc = kubetrain("render", alone)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "spec.model.fromRun" in proc.stderr and "Traceback" not in proc.stderr


def test_render_refuses_a_chain_from_an_adapter_only_run(tmp_path: Path) -> None:
    sft = changed(
        example("tulu-sft"),
        {"spec.method.adapter": {"type": "lora"}, "spec.distributed": {"zeroStage": 0}},
    )
    write(tmp_path / "sft.yaml", sft)
    dpo = write(tmp_path / "dpo.yaml", example("tulu-dpo"))
    proc = kubetrain("render", dpo)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "spec.model.fromRun" in proc.stderr and "merge" in proc.stderr


def test_render_prints_nothing_for_an_invalid_run(tmp_path: Path) -> None:
    good = EXAMPLE_FILES[0]
    bad = write(tmp_path / "bad.yaml", changed(example("tulu-sft"), {"spec.data.blockSize": 0}))
    proc = kubetrain("render", good, bad)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{bad}: spec.data.blockSize:" in proc.stderr


# ---------------------------------------------------------------------------------- fast paths

HEAVY = ("torch", "peft", "deepspeed", "transformers", "kubernetes", "kopf", "kubeflow")


def test_validate_and_render_import_nothing_heavy() -> None:
    code = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from kubetrain_operator.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["validate", *{[str(p) for p in EXAMPLE_FILES]!r}]) == 0
            assert main(["render", "{ROOT / "examples" / "tulu-dpo.yaml"}", "-n", "ml"]) == 0
        assert "kind: PyTorchJob" in out.getvalue()
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(",".join(loaded))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
