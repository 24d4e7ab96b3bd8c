"""The preprocess stage as a process: `kubetrain run --stage preprocess`, and its metrics endpoint.

Real: the `kubetrain` CLI and `python -m kubetrain_trainer preprocess` as subprocesses, the
standard library's text (tests/support/corpus.py) with planted bad rows, the stage's Prometheus
endpoint scraped over HTTP while the stage runs and parsed with prometheus_client's own parser.
Emulated: nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from corpus import write_text_corpus
from kubetrain_trainer.preprocess import dataset
from ports import free_port
from preprocess_support import ROOT, cli, config, docs

pytestmark = pytest.mark.slow  # every test starts stage or operator processes

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def test_kubetrain_run_preprocess_publishes_under_the_cache_dir(tmp_path: Path) -> None:
    corpus = write_text_corpus(tmp_path / "corpus.txt", 60_000)
    doc = yaml.safe_load((ROOT / "examples" / "tinystories-cpu.yaml").read_text())
    doc["spec"]["data"]["train"] = [str(corpus)]
    doc["spec"]["tokenizer"]["train"]["vocabSize"] = 512
    doc["spec"]["output"] = {"uri": str(tmp_path / "output")}
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(doc))
    cache, workdir = (tmp_path / "cache-dir").resolve(), tmp_path / "work"
    argv = [sys.executable, "-m", "kubetrain_operator.cli", "run", str(spec)]
    argv += ["--stage", "preprocess", "--cache-dir", str(cache), "--workdir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    result = json.loads((workdir / "result-preprocess.json").read_text())
    assert result["ok"] is True and result["cacheHit"] is False
    key = result["key"]
    published = cache / "datasets" / key
    assert (published / dataset.SUCCESS).read_text().strip() == key
    assert sorted(p.name for p in (cache / "datasets").iterdir()) == [key], "no staging left"
    pointer = json.loads((tmp_path / "output" / "dataset.json").read_text())
    assert pointer == {"key": key, "uri": str(published), "cacheHit": False}
    path, manifest = dataset.verify_dataset(pointer["uri"])
    assert path == published and manifest["counts"]["tokens"] == result["tokens"] > 0
    assert not (tmp_path / "output" / "cache").exists(), "not the spec's default cache"
    stage_config = json.loads((workdir / "configs" / "preprocess.json").read_text())
    assert stage_config["cacheRoot"] == str(cache)
    assert not (workdir / "result-sanity.json").exists(), "only the preprocess stage ran"


def scrape(port: int) -> Samples | None:
    """Every sample of the endpoint, or None when it does not answer (yet, or any more)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset({"run": "test-run", **labels}.items())), 0.0)


def test_the_metrics_endpoint_serves_growing_series_while_the_stage_runs(tmp_path: Path) -> None:
    texts = docs(8_000_000)
    planted = {"emptyText": '{"text": "  "}', "invalidJson": '{"text": "cut', "wrongType": "[1]"}
    lines, bad = [], dict.fromkeys(planted, 0)
    for i, text in enumerate(texts):
        lines.append(json.dumps({"text": text}))
        if i % 150 == 149:
            reason = list(planted)[(i // 150) % len(planted)]
            lines.append(planted[reason])
            bad[reason] += 1
    source = tmp_path / "big.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    port = free_port()
    cfg = config(tmp_path, [str(source)], metricsPort=port, blockSize=256, maxRejectedFraction=0.1)
    argv, env = cli(cfg, tmp_path)
    with (tmp_path / "stage.log").open("w") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log)
        seen: list[Samples] = []
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            samples = scrape(port)
            if samples is not None and proc.poll() is None:  # scraped while it runs
                seen.append(samples)
            time.sleep(0.05)
        code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "stage.log").read_text()[-3000:]
    result = json.loads((tmp_path / "work" / "result-preprocess.json").read_text())
    assert result["rejected"] == bad and result["cacheHit"] is False

    rows, read = "kubetrain_preprocess_rows_total", "kubetrain_preprocess_read_bytes_total"
    series = {
        "accepted rows": [value(s, rows, result="accepted", reason="") for s in seen],
        "bytes read": [value(s, read) for s in seen],
        "tokens": [value(s, "kubetrain_preprocess_tokens_total") for s in seen],
        "blocks": [value(s, "kubetrain_preprocess_blocks_total") for s in seen],
    }
    for reason in planted:
        series[f"{reason} rows"] = [value(s, rows, result="rejected", reason=reason) for s in seen]
    final = {
        "accepted rows": result["accepted"],
        "bytes read": source.stat().st_size,
        "tokens": result["tokens"],
        "blocks": result["blocks"],
        **{f"{reason} rows": count for reason, count in bad.items()},
    }
    for name, values in series.items():
        assert values == sorted(values), f"{name}: a counter never goes down"
        growing = sorted({v for v in values if 0 < v < final[name]})
        assert len(growing) >= 2, f"{name}: seen growing while the stage ran: {growing}"
        assert values[-1] <= final[name], name
    beats = [value(s, "kubetrain_preprocess_last_progress_timestamp_seconds") for s in seen]
    assert beats == sorted(beats) and beats[0] > 0, "the heartbeat is set at start, never goes back"
    assert len(set(beats)) >= 3, f"the heartbeat advances while rows are read: {set(beats)}"


@pytest.mark.slow  # starts a Python process
def test_the_preprocess_stage_never_imports_torch() -> None:
    """Torch costs about 180 MiB of RSS a process: the CPU stage's memory budget has no room
    for a library it does not use (bench/preprocess.py measures the stage's peak)."""
    probe = (
        "import sys, kubetrain_trainer.__main__, kubetrain_trainer.preprocess.pipeline; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout
