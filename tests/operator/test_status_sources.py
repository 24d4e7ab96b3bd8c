"""Per-source accounting in the status: the preprocess result's `sources` become
status.dataset.sources[], bounded, with entries of the wrong type left out — pure, nothing emulated.

Real: `derive_status` over a run's world (tests/support/status_world.py, which validates every
derived status against the generated CRD's status schema as the API server would) and the
generated CRD's status schema itself. The preprocess result is the stage contract's JSON
(contract-18: `sources`), written here as the trainer writes it.
"""

from __future__ import annotations

from typing import Any

from kubetrain_operator.run_status import SOURCE_ROWS
from operator_support import PREPROCESS_RESULT, result, run_doc
from status_world import World, status_schema_errors, through_data


def source(name: str, split: str = "train", **changes: Any) -> dict[str, Any]:
    """One source's accounting as the preprocess stage reports it."""
    return {
        "name": name,
        "split": split,
        "files": 3,
        "excludedFiles": 2,
        "rowsRead": 400,
        "accepted": 396,
        "rejected": {"emptyText": 4},
        "selected": 198,
        "tokens": 50_688,
        **changes,
    }


def preprocessed(sources: Any) -> World:
    world = World(run_doc())
    world.step()
    world.finish("preprocess", message=result("preprocess", **PREPROCESS_RESULT, sources=sources))
    return world


def test_each_sources_accounting_reaches_status_dataset_sources() -> None:
    reported = [
        source(
            "operatives",
            files=1,
            rowsRead=60_000,
            accepted=59_990,
            selected=50_000,
            rejected={"emptyText": 6, "tooLong": 4},
            tokens=9_876_543,
        ),
        source("policies", rejected={}),
        source("policies-val", "validation", selected=396),
    ]
    world = preprocessed(reported)  # the World checked the status against the CRD's schema
    shown = world.status["dataset"]["sources"]
    assert shown == reported
    assert world.status["dataset"]["rowsRead"] == PREPROCESS_RESULT["rowsRead"]  # unchanged


def test_a_result_without_sources_shows_none() -> None:
    world = World(run_doc())
    through_data(world)
    assert "sources" not in world.status["dataset"]
    assert "sources" not in preprocessed([]).status["dataset"]
    assert "sources" not in preprocessed({"policies": source("policies")}).status["dataset"]


def test_badly_typed_entries_are_left_out_and_the_rest_shown() -> None:
    good = source("policies")
    bad = [
        "policies",
        {"name": "x"},  # counts missing
        source("strings", files="3"),  # a count as text
        source("flag", accepted=True),  # a bool is not a count
        source("half", tokens=1.5),
        source("negative", selected=-1),
        source("excluded", excludedFiles=-1),
        source("reasons", rejected={"emptyText": -2}),
        source("reasons-list", rejected=[["emptyText", 2]]),
        source("test", split="test"),
        source("Policies"),  # not a DNS label
        source("n" * 64),
    ]
    world = preprocessed([*bad, good])
    assert world.status["dataset"]["sources"] == [good]


def test_status_dataset_sources_is_bounded() -> None:
    reported = [source(f"s-{i:03d}") for i in range(SOURCE_ROWS + 6)]
    shown = preprocessed(reported).status["dataset"]["sources"]
    assert [s["name"] for s in shown] == [f"s-{i:03d}" for i in range(SOURCE_ROWS)]


def test_the_crd_schema_types_status_dataset_sources() -> None:
    entry = source("policies")
    assert status_schema_errors({"dataset": {"sources": [entry]}}) == []
    wrong = [
        {**entry, "rowsRead": -1},
        {**entry, "rejected": {"emptyText": "4"}},
        {**entry, "split": "test"},
        {**entry, "surprise": 1},
        {k: v for k, v in entry.items() if k != "tokens"},
    ]
    for bad in wrong:
        assert status_schema_errors({"dataset": {"sources": [bad]}}), bad
    too_many = [source(f"s-{i}") for i in range(SOURCE_ROWS + 1)]
    assert status_schema_errors({"dataset": {"sources": too_many}})


def test_a_hub_sources_commit_is_shown_and_a_malformed_one_left_out() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    shown = preprocessed(
        [source("tulu", commit=commit), source("local", commit=None), source("bad", commit="main")]
    ).status["dataset"]["sources"]
    assert [(s["name"], s.get("commit")) for s in shown] == [("tulu", commit), ("local", None)]
