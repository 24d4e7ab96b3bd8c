"""The stage result: whole in the workdir, ≤ 4 KiB of valid JSON for the kubelet's termination log.

Real: the stage module's own functions and files on disk. Nothing is emulated; the kubelet's
4 KiB limit on termination messages is the documented constant.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain_trainer.stage import RESULT_LIMIT, termination_message, write_result


@pytest.mark.parametrize("unit", ["a", "é", "\n", "\x01", "a\x01é\n", "🙂"])
@pytest.mark.parametrize("repeat", [10, 1500, 5000, 40000])
def test_termination_message_is_valid_json_within_the_limit(unit: str, repeat: int) -> None:
    error = unit * repeat + " — the end"
    result = {
        "stage": "preprocess",
        "ok": False,
        "exitCode": 2,
        "error": error,
        "rejected": {"emptyText": 3},
        "firstRejected": {"emptyText": ["a.jsonl:1"] * 500},
    }
    message = termination_message(result)
    parsed = json.loads(message)
    assert len(message.encode()) <= RESULT_LIMIT
    assert parsed["exitCode"] == 2 and parsed["stage"] == "preprocess"
    if len(json.dumps(result, ensure_ascii=False).encode()) <= RESULT_LIMIT:
        assert parsed == result
    else:
        assert parsed["truncated"] is True
        if repeat == 10:  # only the nested details had to go
            assert parsed["error"] == error
        else:  # the error keeps its head: the part that says what went wrong
            head = parsed["error"].removesuffix("…")
            assert error.startswith(head) and len(head) > 100


def test_the_workdir_keeps_the_whole_result(tmp_path: Path) -> None:
    result = {"stage": "train", "ok": True, "losses": list(range(2000))}
    path = write_result("train", result, tmp_path / "work")
    assert path == tmp_path / "work" / "result-train.json"
    assert json.loads(path.read_text()) == result
