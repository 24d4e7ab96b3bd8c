"""The `kubetrain` CLI: `validate` and `render`, run as real subprocesses on real files; `run`'s
flags and the figures of its closing summary (stage results as the trainer writes them; the runs
themselves are tests/end_to_end/test_local_run.py).

Real: the installed `kubetrain` console script (or `python -m kubetrain_operator.cli` where the
script is missing), the shipped examples, files written to a temporary directory, exit codes and
the text on stdout/stderr; the import check runs a fresh interpreter. Nothing is emulated.
Expected output is derived from the contract in docs/cli.md (`FILE: spec.path: problem — what to
do` on stderr; exit 0 done, 1 invalid input, 2 usage error) and from the example documents.
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

from runspecs import EXAMPLE_FILES, LOCAL_ONLY, ROOT, VARIANTS, all_documents, changed, example

CLUSTER_EXAMPLES = [p for p in EXAMPLE_FILES if p.stem not in LOCAL_ONLY]
LOCAL_EXAMPLES = [p for p in EXAMPLE_FILES if p.stem in LOCAL_ONLY]
INVALID, USAGE = 1, 2  # docs/cli.md

SCRIPT = shutil.which("kubetrain", path=str(Path(sys.executable).parent))
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "kubetrain_operator.cli"]
LINE = re.compile(r"^(?P<file>[^:]+): (?P<path>[^: ]+|line \d+): (?P<problem>.+) — (?P<fix>.+)$")


def kubetrain(
    *args: str | Path, cwd: Path = ROOT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        input=stdin,
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


def test_validate_accepts_every_example_for_its_target() -> None:
    proc = kubetrain("validate", *(p.relative_to(ROOT) for p in CLUSTER_EXAMPLES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    local = kubetrain(
        "validate", "--target", "local", *(p.relative_to(ROOT) for p in LOCAL_EXAMPLES)
    )
    assert local.returncode == 0, local.stderr


#: The fields of each local example that name local paths: what a cluster refuses.
LOCAL_FIELDS = {
    "tinystories-cpu": {"spec.data.train[0]", "spec.output.uri"},
    "mixture-cpu": {
        *(f"spec.data.sources[{i}].uri" for i in range(3)),
        "spec.data.validationSources[0].uri",
        "spec.output.uri",
    },
}


@pytest.mark.parametrize("example_file", LOCAL_EXAMPLES, ids=lambda p: p.stem)
def test_validate_for_a_cluster_refuses_what_render_refuses(example_file: Path) -> None:
    """The local examples read and write local paths: `kubetrain run` takes them, a pod cannot."""
    path = example_file.relative_to(ROOT)
    validate, render = kubetrain("validate", path), kubetrain("render", path)
    assert validate.returncode == render.returncode == INVALID
    assert validate.stderr == render.stderr and render.stdout == ""
    paths = {m["path"] for m in problem_lines(validate.stderr, path)}
    assert paths == LOCAL_FIELDS[example_file.stem]
    assert "pvc://" in validate.stderr and "s3://" in validate.stderr


def _table() -> dict[str, dict[str, Any]]:
    """Valid specs, and specs that only the plan refuses (local paths, pvc:// escapes, …)."""
    docs = dict(all_documents())
    tulu = example("llama-lora-merge")
    docs["local-model"] = changed(tulu, {"spec.model.uri": "models/llama"})
    docs["file-scheme-output"] = changed(tulu, {"spec.output.uri": "file:///runs/x"})
    docs["local-cache"] = changed(tulu, {"spec.storage.cacheRoot": "/var/cache/kubetrain"})
    docs["pvc-escape"] = changed(tulu, {"spec.output.uri": "pvc://runs/../../etc"})
    docs["hub-dataset"] = changed(tulu, {"spec.data.train": ["hf://datasets/org/x"]})
    docs["hub-model"] = VARIANTS["hub-model"]
    docs["bad-rung"] = changed(
        VARIANTS["ladder-2x4"],
        {"spec.sanity.rungs": [{"gpus": 2, "optimizer": "adamw_8bit"}]},
    )
    return docs


TABLE = _table()


@pytest.mark.parametrize("doc_id", sorted(TABLE))
def test_validate_and_render_agree(doc_id: str, tmp_path: Path) -> None:
    """Exit 0 for both, or a problem from validate (the same one render prints)."""
    doc = TABLE[doc_id]
    upstream = example("tulu-sft")
    files = [write(tmp_path / "run.yaml", doc), write(tmp_path / "upstream.yaml", upstream)]
    validate, render = kubetrain("validate", files[0]), kubetrain("render", files[0])
    assert validate.returncode == render.returncode, (validate.stderr, render.stderr)
    if validate.returncode == 0:
        assert yaml.safe_load_all(render.stdout)
    else:
        assert validate.returncode == INVALID
        assert problem_lines(validate.stderr, files[0])
        assert validate.stderr == render.stderr and render.stdout == ""


FIELD_PROBLEMS = {
    "metadata.name": {"metadata.name": "Bad_Name"},
    "spec.training.microBatchSize": {"spec.training.microBatchSize": 0},
    "spec.data.blockSize": {"spec.data.blockSize": "large"},
    "spec.resources.gpuResource": {"spec.resources.gpuResource": "GPU!"},
    "spec.output.uri": {"spec.output.uri": "ftp://runs/x"},
    "spec.optimiser": {"spec.optimiser": "adamw_torch"},
    "spec.distributed.zeroStage": {"spec.distributed.zeroStage": 4},
}


def test_validate_prints_one_line_per_problem_on_stderr(tmp_path: Path) -> None:
    doc = example("tulu-sft")
    for change in FIELD_PROBLEMS.values():
        doc = changed(doc, change)
    bad = write(tmp_path / "bad.yaml", doc)
    proc = kubetrain("validate", bad)
    assert proc.returncode == INVALID
    assert proc.stdout == ""
    lines = problem_lines(proc.stderr, bad)
    assert sorted(m["path"] for m in lines) == sorted(FIELD_PROBLEMS)


def test_validate_reports_field_and_cross_field_problems_in_one_run(tmp_path: Path) -> None:
    # a field error (blockSize is not a number) and two api.md rules elsewhere (fp16 needs a
    # GPU; output.merge needs an adapter): all three in one run
    doc = changed(
        example("tinystories"),
        {
            "spec.resources.gpusPerNode": 0,
            "spec.sanity.gpus": 0,
            "spec.training.precision": "fp16",
            "spec.output.merge": True,
            "spec.checkpoints.keep": "many",
        },
    )
    bad = write(tmp_path / "cross.yaml", doc)
    proc = kubetrain("validate", bad)
    assert proc.returncode == INVALID
    paths = [m["path"] for m in problem_lines(proc.stderr, bad)]
    assert sorted(paths) == [
        "spec.checkpoints.keep",
        "spec.output.merge",
        "spec.sanity.gpus",
        "spec.training.precision",
    ]


def test_validate_runs_the_rules_that_do_not_read_the_broken_section(tmp_path: Path) -> None:
    # an unknown field in training, and a rung wider than the run: rung-gpus-within-run reads
    # only sanity and resources, so both lines come out
    doc = changed(
        example("tulu-sft"),
        {"spec.training.learningRat": 1e-4, "spec.resources.gpusPerNode": 2},
    )
    doc["spec"]["sanity"] = {"rungs": [{"gpus": 4, "steps": 10}]}
    bad = write(tmp_path / "rung.yaml", doc)
    proc = kubetrain("validate", bad)
    assert proc.returncode == INVALID
    paths = [m["path"] for m in problem_lines(proc.stderr, bad)]
    assert paths == ["spec.training.learningRat", "spec.sanity.rungs[0].gpus"]


def test_validate_checks_every_file_and_names_the_bad_one(tmp_path: Path) -> None:
    good = CLUSTER_EXAMPLES[0]
    bad = write(tmp_path / "bad.yaml", changed(example("tulu-sft"), {"spec.maxRestarts": -1}))
    proc = kubetrain("validate", good, bad)
    assert proc.returncode == INVALID
    (line,) = problem_lines(proc.stderr, bad)
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
          data: {format: text, train: [s3://d/x.txt]}
        """
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text(text, encoding="utf-8")
    proc = kubetrain("validate", broken)
    assert proc.returncode == INVALID
    (line,) = problem_lines(proc.stderr, broken)
    assert line["path"] == "line 6"  # the `model: uri:` line
    assert "Traceback" not in proc.stderr


def test_other_kinds_are_reported(tmp_path: Path) -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    mixed = write(tmp_path / "mixed.yaml", config_map, example("tulu-sft"))
    proc = kubetrain("validate", mixed)
    assert proc.returncode == INVALID
    (line,) = problem_lines(proc.stderr, mixed)
    assert line["path"] == "kind" and "ConfigMap" in line["problem"]


@pytest.mark.parametrize("case", ["empty", "missing", "a list"])
def test_unusable_files_are_reported_not_crashed_on(case: str, tmp_path: Path) -> None:
    path = tmp_path / f"{case.replace(' ', '-')}.yaml"
    if case == "empty":
        path.write_text("", encoding="utf-8")
    elif case == "a list":
        path.write_text("- 1\n- 2\n", encoding="utf-8")
    proc = kubetrain("validate", path)
    assert proc.returncode == INVALID
    assert len(problem_lines(proc.stderr, path)) == 1
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------- CLI habits


@pytest.mark.parametrize("args", [["-"], ["-f", "-"]])
def test_stdin_is_a_file_too(args: list[str]) -> None:
    text = (ROOT / "examples" / "tulu-sft.yaml").read_text()
    proc = kubetrain("render", *args, stdin=text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == kubetrain("render", "examples/tulu-sft.yaml").stdout
    bad = kubetrain("validate", *args, stdin=text.replace("blockSize: 4096", "blockSize: 0"))
    assert bad.returncode == INVALID
    assert [m["path"] for m in problem_lines(bad.stderr, Path("-"))] == ["spec.data.blockSize"]


def test_version_and_usage_errors_keep_their_own_codes() -> None:
    version = kubetrain("--version")
    assert version.returncode == 0 and version.stdout.startswith("kubetrain ")
    for args in (["render"], ["validate", "--target", "moon", "x.yaml"], ["nonsense"]):
        proc = kubetrain(*args)
        assert proc.returncode == USAGE, args
        assert "usage:" in proc.stderr and proc.stdout == ""


def test_crd_as_yaml_or_json() -> None:
    as_yaml, as_json = kubetrain("crd"), kubetrain("crd", "-o", "json")
    assert as_yaml.returncode == as_json.returncode == 0
    assert json.loads(as_json.stdout)["items"] == [yaml.safe_load(as_yaml.stdout)]


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
        ("PyTorchJob", "sanity-1"),
        ("PyTorchJob", "sanity-2"),
        ("PyTorchJob", "sanity-3"),
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
    for name in ("sanity-1.json", "sanity-3.json", "train.json", "merge.json"):
        assert configs[name]["model"]["uri"] == expected
        assert configs[name]["method"] == "dpo"


def test_render_without_a_namespace_and_both_runs_of_a_chain() -> None:
    proc = kubetrain("render", "examples/tulu-sft.yaml", "examples/tulu-dpo.yaml")
    assert proc.returncode == 0, proc.stderr
    objects = list(yaml.safe_load_all(proc.stdout))
    sft, dpo = (len(example(n)["spec"]["sanity"]["rungs"]) for n in ("tulu-sft", "tulu-dpo"))
    assert len(objects) == (5 + sft) + (5 + dpo)
    assert all("namespace" not in o["metadata"] for o in objects)
    runs = [o["metadata"]["labels"]["kubetrain.dev/run"] for o in objects]
    assert runs == ["llama31-tulu-sft"] * (5 + sft) + ["llama31-tulu-dpo"] * (5 + dpo)


def test_render_refuses_a_chain_without_its_upstream(tmp_path: Path) -> None:
    alone = write(tmp_path / "dpo.yaml", example("tulu-dpo"))
    proc = kubetrain("render", alone)
    assert proc.returncode == INVALID
    assert proc.stdout == ""
    assert "spec.model.fromRun" in proc.stderr and "Traceback" not in proc.stderr


def test_render_refuses_a_chain_from_an_adapter_only_run(tmp_path: Path) -> None:
    sft = changed(
        example("tulu-sft"),
        {
            "spec.method.adapter": {"type": "lora"},
            "spec.distributed": {"zeroStage": 0},
            "spec.sanity": {"gpus": 1},
        },
    )
    write(tmp_path / "sft.yaml", sft)
    dpo = write(tmp_path / "dpo.yaml", example("tulu-dpo"))
    proc = kubetrain("render", dpo)
    assert proc.returncode == INVALID
    assert proc.stdout == ""
    assert "spec.model.fromRun" in proc.stderr and "merge" in proc.stderr


def test_render_prints_nothing_for_an_invalid_run(tmp_path: Path) -> None:
    good = CLUSTER_EXAMPLES[0]
    bad = write(tmp_path / "bad.yaml", changed(example("tulu-sft"), {"spec.data.blockSize": 0}))
    proc = kubetrain("render", good, bad)
    assert proc.returncode == INVALID
    assert proc.stdout == ""
    assert f"{bad}: spec.data.blockSize:" in proc.stderr


# ---------------------------------------------------------------------------------- fast paths

HEAVY = ("torch", "peft", "deepspeed", "transformers", "kubernetes", "kopf", "kubeflow")


@pytest.mark.slow  # starts a stage or operator process
def test_validate_and_render_import_nothing_heavy() -> None:
    code = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from kubetrain_operator.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["validate", *{[str(p) for p in CLUSTER_EXAMPLES]!r}]) == 0
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


# ------------------------------------------------------------------------------------------ run


def test_run_has_a_verbose_flag() -> None:
    done = kubetrain("run", "--help")
    assert done.returncode == 0, done.stderr
    assert "-v, --verbose" in done.stdout


def test_run_summary_headline_comes_from_the_stage_results() -> None:
    from kubetrain_operator.local import headline

    train = {"ok": True, "firstLoss": 6.93712, "loss": 0.70151, "tokensPerSecond": 5432.4}
    merge = {"ok": True, "perplexity": 2.01349, "evalLoss": 0.7}
    assert headline({"train": train, "merge": merge}) == (
        "loss 6.9371 → 0.7015, validation perplexity 2.013, 5,432 tokens/s"
    )
    # no merge stage run: training's own evaluation; nothing trained yet: no figures at all
    assert headline({"train": {**train, "evalLoss": 0.0}}).endswith(
        "validation perplexity 1.000, 5,432 tokens/s"
    )
    assert headline({"preprocess": {"ok": True}}) == ""


def test_run_summary_shows_each_rungs_peak_beside_its_estimate() -> None:
    from kubetrain_operator.local import measured

    gib = 1024**3
    gpu = {
        "memoryPeakAllocatedBytes": int(61.3 * gib),
        "memoryPeakRssBytes": 9 * gib,
        "deviceMemoryBytes": 80 * gib,
        "memoryEstimateBytes": int(58.9 * gib),
        "tokensPerSecond": 5432.4,
    }
    assert measured(gpu) == (
        "peak 61.3 GiB of the GPU's 80.0 GiB, estimate 58.9 GiB, 5,432 tokens/s"
    )
    cpu = {**gpu, "memoryPeakAllocatedBytes": None, "deviceMemoryBytes": None}
    assert measured({**cpu, "memoryEstimateBytes": None}) == "peak 9.0 GiB RSS, 5,432 tokens/s"
    assert measured({"ok": True, "cacheHit": True}) == ""  # preprocess: no figures


def test_run_prints_the_per_source_table_from_the_preprocess_result() -> None:
    from kubetrain_operator.local import source_table

    sources = [
        {
            "name": "operatives",
            "split": "train",
            "files": 1,
            "rowsRead": 60000,
            "accepted": 59990,
            "rejected": {"tooLong": 4, "emptyText": 6},
            "selected": 50000,
            "tokens": 9876543,
        },
        {
            "name": "policies",
            "split": "train",
            "files": 12,
            "rowsRead": 400,
            "accepted": 400,
            "rejected": {},
            "selected": 200,
            "tokens": 50688,
        },
        {
            "name": "policies-val",
            "split": "validation",
            "files": 2,
            "rowsRead": 40,
            "accepted": 39,
            "rejected": {"emptyText": 1},
            "selected": 39,
            "tokens": 1000,
        },
    ]
    assert source_table(sources) == [
        "  source        split       files    read  accepted  rejected  selected     tokens",
        "  operatives    train           1  60,000    59,990        10    50,000  9,876,543"
        "  emptyText 6, tooLong 4",
        "  policies      train          12     400       400         0       200     50,688",
        "  policies-val  validation      2      40        39         1        39      1,000"
        "  emptyText 1",
        "  all                          15  60,440    60,429        11    50,239  9,928,231"
        "  emptyText 7, tooLong 4",
    ]
    # one source: no total line; a count of the wrong type shows as 0; no sources: no table
    one = source_table([{**sources[1], "files": "12", "rejected": {"emptyText": True}}, "x"])
    assert one[1] == "  policies  train      0   400       400         0       200  50,688"
    assert len(one) == 2
    assert source_table(None) == source_table([]) == []
