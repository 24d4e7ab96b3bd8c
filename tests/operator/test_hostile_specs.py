"""Run files a careless user or an attacker writes, where `kubetrain validate` must say what the
API server, kubectl or the trainer would say, in one line (issue 16, item 6).

Real: `kubetrain_operator.cli.main` in this process (the same code the console script runs: the
YAML loader of documents.py, `api.parse_run`, the problem lines on stderr), the example runs of
examples/, files in a temporary directory. Nothing is emulated. The URI and name cases that the
CRD must refuse too are cases of tests/operator/test_api.py (they check both sides).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetrain_operator import api, cli
from runspecs import changed, example

INVALID = 1  # docs/cli.md
LINE = re.compile(r"^(?P<file>[^:]+): (?P<where>[^:]+): (?P<problem>.+) — (?P<fix>.+)$")


def validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[re.Match[str]]]:
    """`kubetrain validate FILE`: its exit code and its problem lines (each must be one)."""
    code = cli.main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), f"not `FILE: where: problem — fix` lines:\n{err}"
    return code, [m for m in matches if m]


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyYAML keeps the last `output:` silently; kubectl refuses the file. So does validate."""
    text = yaml.safe_dump(example("llama-lora-merge"), sort_keys=False)
    text += "  output: {uri: s3://elsewhere/run/}\n"  # a second spec.output
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    second = len(text.splitlines())
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line == "  output:")
    code, [line] = validate(path, capsys)
    assert code == INVALID
    assert line["file"] == str(path) and line["where"] == f"line {second}"
    assert f"duplicate key 'output' (first on line {first})" in line["problem"]


def test_merge_keys_still_override(tmp_path: Path) -> None:
    """`<<:` brings keys that the mapping may override: that is not a repeated key."""
    text = yaml.safe_dump(example("llama-lora-merge"), sort_keys=False)
    text = text.replace("  training:\n", "  training:\n    <<: {epochs: 1}\n", 1)
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    assert cli.main(["validate", str(path)]) == 0


NON_FINITE = [
    ("spec.training.maxGradNorm", float("inf")),
    ("spec.method.adapter.alpha", float("inf")),
    ("spec.output.maxPerplexity", float("inf")),
    ("spec.training.learningRate", float("nan")),
    ("spec.training.epochs", float("nan")),
]


@pytest.mark.parametrize(("path", "value"), NON_FINITE, ids=[p for p, _ in NON_FINITE])
def test_non_finite_floats_are_refused(path: str, value: float) -> None:
    """`.inf` would reach the stage JSON as `Infinity`, which JSON (and the API server) lacks."""
    doc: dict[str, Any] = changed(example("llama-lora-merge"), {path: value})
    with pytest.raises(api.InvalidRun) as refused:
        api.parse_run(doc)
    [problem] = refused.value.problems
    assert problem.path == path
    assert "finite" in problem.message and " — " in problem.message


def test_deep_nesting_is_one_problem_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("spec: " + "[" * 600 + "\n", encoding="utf-8")
    code, [line] = validate(path, capsys)
    assert code == INVALID
    assert line["file"] == str(path) and line["where"] == "line 1"
    assert "nested too deeply" in line["problem"]
