"""`kubetrain run examples/mixture-cpu.yaml`: a local three-source mixture and its per-source table.

Real: the `kubetrain` CLI as a subprocess running the real preprocess stage on the example as
shipped (its files under examples/data/, written by examples/data/generate.py --mixture): the
text reader, the JSON Lines reader with three empty rows, a folder source with an excluded
subfolder, the seeded selection (fraction below and above 1, maxRows), BPE training and packing.
Only the output and work directories move to a temporary folder. Nothing is emulated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBETRAIN = [sys.executable, "-m", "kubetrain_operator.cli"]

pytestmark = pytest.mark.slow

#: What the example's files and terms give (examples/data/generate.py --mixture, the spec):
#: name → (split, files, rows read, accepted, rejected, selected).
EXPECTED = {
    "fables": ("train", 1, 303, 300, {"emptyText": 3}, 600),  # fraction 2: two whole passes
    "notes": ("train", 2, 300, 300, {}, 200),  # drafts/ excluded; maxRows 200
    "stories": ("train", 1, 6000, 6000, {}, 1500),  # fraction 0.25
    "held-out": ("validation", 1, 100, 100, {}, 100),
}


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed per-source table's lines by their first cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["source", "split"])
    rows = {}
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells or cells[0] not in {*EXPECTED, "all"}:
            break
        rows[cells[0]] = cells
    return rows


def test_the_three_source_mixture_shows_each_sources_counts(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "mixture-cpu.yaml").read_text())
    doc["spec"]["output"] = {"uri": str(tmp_path / "output")}
    spec = tmp_path / "mixture-cpu.yaml"
    spec.write_text(yaml.safe_dump(doc))
    work = tmp_path / "work"
    done = subprocess.run(
        [*KUBETRAIN, "run", str(spec), "--workdir", str(work), "--stage", "preprocess"],
        cwd=ROOT,  # the example's relative paths, as a user in the repository types it
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads((work / "result-preprocess.json").read_text())
    sources = {s["name"]: s for s in result["sources"]}
    assert set(sources) == set(EXPECTED)
    for name, (split, files, read, accepted, rejected, selected) in EXPECTED.items():
        got = sources[name]
        assert (got["split"], got["files"], got["rowsRead"], got["accepted"]) == (
            split,
            files,
            read,
            accepted,
        ), name
        assert (got["rejected"], got["selected"]) == (rejected, selected), name
        assert got["tokens"] > 0, name
    assert sum(s["rowsRead"] for s in sources.values()) == result["rowsRead"]
    # the table the user sees: the same figures, a total line under them
    shown = table_rows(done.stderr)  # the console writes to stderr (docs/cli.md)
    for name, (split, files, read, accepted, rejected, selected) in EXPECTED.items():
        cells = shown[name]
        counts = [int(c.replace(",", "")) for c in cells[2:8]]
        tokens = sources[name]["tokens"]
        assert cells[1] == split
        assert counts == [files, read, accepted, sum(rejected.values()), selected, tokens], cells
    assert shown["fables"][8:] == ["emptyText", "3"]
    total = [int(c.replace(",", "")) for c in shown["all"][1:7]]
    assert total[1] == result["rowsRead"] == sum(e[2] for e in EXPECTED.values())
