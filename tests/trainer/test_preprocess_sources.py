"""Data sources with their own terms (issue 18): selection, exclusion, accounting, the key.

Real: the preprocess stage end to end on corpora the tests write (text from the standard
library), the test BPE tokenizer; nothing is emulated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetrain_trainer.config import SourceConfig
from kubetrain_trainer.metrics import PreprocessMetrics
from kubetrain_trainer.preprocess import mixture
from kubetrain_trainer.stage import InvalidInput
from preprocess_support import config, docs, file_hashes, run_stage, source, write_jsonl

ROWS = 40


def unique_docs() -> list[str]:
    """The corpus's paragraphs, each once (a repeated row would blur the counts)."""
    return list(dict.fromkeys(docs()))


def corpus(tmp: Path, name: str, rows: int = ROWS, offset: int = 0) -> Path:
    """`rows` distinct documents as JSON Lines (each row once: selection is countable)."""
    texts = unique_docs()[offset : offset + rows]
    assert len(set(texts)) == rows
    return write_jsonl(tmp / f"{name}.jsonl", ({"text": t} for t in texts))


def mixed(tmp: Path, sources: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    cfg = config(tmp, [], **overrides)
    cfg["sources"] = sources
    return cfg


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in result["sources"]}


def three(tmp: Path, **terms: dict[str, Any]) -> list[dict[str, Any]]:
    """Three sources a, b, c of ROWS rows each, with per-source `terms`."""
    return [
        source(name, str(corpus(tmp, name, offset=k * ROWS)), **terms.get(name, {}))
        for k, name in enumerate(("a", "b", "c"))
    ]


def test_selected_rows_follow_fraction_and_max_rows_exactly(tmp_path: Path) -> None:
    sources = three(
        tmp_path,
        a={"fraction": 0.25},  # round(0.25 × 40) = 10
        b={"fraction": 1.0},  # every row once
        c={"fraction": 2.5},  # 2 passes (80) + round(0.5 × 40) = 100
    )
    sources.append(source("d", sources[0]["uri"], fraction=2.5, maxRows=47))
    result = run_stage(mixed(tmp_path, sources), tmp_path / "w")
    table = by_name(result)
    assert {n: s["selected"] for n, s in table.items()} == {"a": 10, "b": 40, "c": 100, "d": 47}
    assert all(s["accepted"] == ROWS and s["rowsRead"] == ROWS for s in table.values())
    assert sum(s["rowsRead"] for s in table.values()) == result["rowsRead"]
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 10 + 40 + 100 + 47
    assert [s["name"] for s in manifest["sources"]] == ["a", "b", "c", "d"]


def test_passes_are_seeded_whole_then_remainder_then_capped() -> None:
    def terms(**kw: Any) -> SourceConfig:
        base = source("s", "x.jsonl")
        return SourceConfig.model_validate({**base, **kw})

    whole = mixture.passes(terms(), 10, 1)
    assert [list(p) for p in whole] == [list(range(10))]  # no terms: every row, in read order
    two = mixture.passes(terms(fraction=2.3), 10, 1)
    assert [len(p) for p in two] == [10, 10, 3]
    assert all(list(p) == sorted(p) for p in two)  # each pass in read order
    assert set(two[2]) < set(range(10))
    capped = mixture.passes(terms(fraction=2.3, maxRows=15), 10, 1)
    assert [len(p) for p in capped] == [10, 5]
    assert list(mixture.passes(terms(fraction=0.3), 10, 1)[0]) == list(two[2])  # same order
    assert list(mixture.passes(terms(fraction=0.3), 10, 2)[0]) != list(two[2])  # seed
    other = SourceConfig.model_validate({**source("t", "x.jsonl"), "fraction": 0.3})
    assert list(mixture.passes(other, 10, 1)[0]) != list(two[2])  # the source's name


def test_the_same_mixture_twice_gives_the_same_bytes_and_order_does_not_matter(
    tmp_path: Path,
) -> None:
    sources = three(tmp_path, a={"fraction": 0.5}, c={"fraction": 1.5, "maxRows": 55})
    first = run_stage(mixed(tmp_path, sources), tmp_path / "w1")
    again_cfg = mixed(tmp_path, sources, cacheRoot=str(tmp_path / "cache2"))
    again = run_stage(again_cfg, tmp_path / "w2")
    reordered_cfg = mixed(tmp_path, sources[::-1], cacheRoot=str(tmp_path / "cache3"))
    reordered = run_stage(reordered_cfg, tmp_path / "w3")
    assert first["key"] == again["key"] == reordered["key"]
    assert not again["cacheHit"] and not reordered["cacheHit"]
    reference = file_hashes(Path(first["uri"]))
    assert file_hashes(Path(again["uri"])) == reference
    assert file_hashes(Path(reordered["uri"])) == reference

    changed = [dict(sources[0], fraction=0.6), *sources[1:]]
    moved = run_stage(mixed(tmp_path, changed), tmp_path / "w4")
    assert moved["key"] != first["key"]
    assert by_name(moved)["a"]["selected"] == 24


def test_excluded_files_contribute_no_row(tmp_path: Path) -> None:
    root = tmp_path / "policy"
    for folder, offset in (("hr", 0), ("hr/processed", 40), ("it/failed", 80), ("it", 120)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        corpus(root / folder, "rows", rows=20, offset=offset)
    terms = {"exclude": ["*/processed/*", "*/failed/*"]}
    result = run_stage(mixed(tmp_path, [source("policies", f"{root}/", **terms)]), tmp_path / "w")
    entry = by_name(result)["policies"]
    assert (entry["files"], entry["excludedFiles"]) == (2, 2)
    assert entry["rowsRead"] == entry["selected"] == 40 == result["rowsRead"]
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    read = sorted(Path(i["uri"]).relative_to(root).as_posix() for i in manifest["inputs"])
    assert read == ["hr/rows.jsonl", "it/rows.jsonl"]


def test_an_empty_required_source_fails_naming_it_and_an_optional_one_passes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ops"
    (root / "processed").mkdir(parents=True)
    corpus(root / "processed", "done")
    kept = source("kept", str(corpus(tmp_path, "kept")))
    empty = source("operatives", f"{root}/", exclude=["processed/*"])
    with pytest.raises(InvalidInput, match=r"sources\[operatives\]: yielded no rows") as failed:
        run_stage(mixed(tmp_path, [kept, empty]), tmp_path / "w")
    assert failed.value.exit_code == 2
    assert failed.value.details["source"] == "operatives"

    result = run_stage(mixed(tmp_path, [kept, {**empty, "optional": True}]), tmp_path / "w2")
    entry = by_name(result)["operatives"]
    assert (entry["files"], entry["excludedFiles"], entry["selected"]) == (0, 1, 0)
    assert by_name(result)["kept"]["selected"] == ROWS


def noisy(tmp: Path, name: str, offset: int, bad: int) -> Path:
    """ROWS good rows and `bad` broken ones of three reasons."""
    lines = [json.dumps({"text": t}) for t in unique_docs()[offset : offset + ROWS]]
    broken = ["{not json", json.dumps({"body": "no text field"}), json.dumps({"text": "  "})]
    for k in range(bad):
        lines.insert(3 * k + 1, broken[k % 3])
    path = tmp / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rejects_per_source_sum_to_the_totals_and_limits_apply_per_source(
    tmp_path: Path,
) -> None:
    sources = [
        source("clean", str(noisy(tmp_path, "clean", 0, 0))),
        source("some", str(noisy(tmp_path, "some", 40, 4)), maxRejectedFraction=0.2),
        source("more", str(noisy(tmp_path, "more", 80, 9)), maxRejectedFraction=0.3),
    ]
    metrics = PreprocessMetrics("test-run")
    result = run_stage(mixed(tmp_path, sources, maxRejectedFraction=0.0), tmp_path / "w", metrics)
    table = by_name(result)
    assert table["some"]["rejected"] == {"invalidJson": 2, "missingField": 1, "emptyText": 1}
    assert table["more"]["rejected"] == {"invalidJson": 3, "missingField": 3, "emptyText": 3}
    totals: dict[str, int] = {}
    for entry in table.values():
        for reason, count in entry["rejected"].items():
            totals[reason] = totals.get(reason, 0) + count
    assert totals == result["rejected"]
    assert sum(e["rowsRead"] for e in table.values()) == result["rowsRead"]
    assert sum(e["accepted"] for e in table.values()) == result["accepted"]

    def sample(outcome: str, name: str) -> float | None:
        labels = {"run": "test-run", "source": name, "outcome": outcome}
        return metrics.registry.get_sample_value("kubetrain_preprocess_source_rows_total", labels)

    assert sample("read", "more") == ROWS + 9
    assert sample("rejected", "more") == 9
    for reason, count in table["more"]["rejected"].items():
        labels = {"run": "test-run", "source": "more", "reason": reason}
        name = "kubetrain_preprocess_source_rejected_rows_total"
        assert metrics.registry.get_sample_value(name, labels) == count
    files = {"run": "test-run", "source": "some", "state": "read"}
    assert metrics.registry.get_sample_value("kubetrain_preprocess_source_files", files) == 1
    assert sample("selected", "some") == ROWS
    tokens = metrics.registry.get_sample_value(
        "kubetrain_preprocess_source_tokens_total", {"run": "test-run", "source": "clean"}
    )
    assert tokens == table["clean"]["tokens"] > 0

    strict = [*sources[:2], {**sources[2], "maxRejectedFraction": 0.1}]
    with pytest.raises(InvalidInput, match=r"sources\[more\]: 9 of 49 rows rejected") as failed:
        run_stage(mixed(tmp_path, strict, maxRejectedFraction=0.5), tmp_path / "w2")
    assert failed.value.details["source"] == "more"
    # the default is data.maxRejectedFraction: 4 of 44 is above 5%
    default = [*sources[:1], {**sources[1], "maxRejectedFraction": None}]
    with pytest.raises(InvalidInput, match=r"sources\[some\]: .* above maxRejectedFraction 5"):
        run_stage(mixed(tmp_path, default, maxRejectedFraction=0.05), tmp_path / "w3")


def test_take_gathers_rows_in_the_given_order() -> None:
    values = np.arange(10, dtype=np.int32)
    lengths = np.array([3, 1, 4, 2], dtype=np.int32)
    got = mixture.take({"input_ids": (values, lengths)}, np.array([2, 0, 2, 3]))
    ids, got_lengths = got["input_ids"]
    assert got_lengths.tolist() == [4, 3, 4, 2]
    assert ids.tolist() == [4, 5, 6, 7, 0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_whole_passes_write_the_rows_they_hold_as_they_were_read(tmp_path: Path) -> None:
    """A source whose passes are all whole (maxRows above its size, a fraction of 2) is written
    from the chunks it holds, without gathering: one pass gives the shards of the source without
    terms, two passes those of the same file listed as two plain sources."""
    data = str(corpus(tmp_path, "a"))

    def shards(name: str, sources: list[dict[str, Any]]) -> dict[str, str]:
        cfg = mixed(tmp_path, sources, cacheRoot=str(tmp_path / f"cache-{name}"))
        result = run_stage(cfg, tmp_path / f"w-{name}")
        hashes = file_hashes(Path(result["uri"]))
        return {k: v for k, v in hashes.items() if k.endswith(".arrow")}

    plain = shards("plain", [source("a", data)])
    assert plain and shards("capped", [source("a", data, maxRows=10**6)]) == plain
    twice = shards("twice", [source("a", data, fraction=2.0)])
    assert twice == shards("listed-twice", [source("a", data), source("b", data)]) != plain
