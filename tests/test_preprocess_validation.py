"""Row validation: planted bad rows of every reason give exact counts; above the threshold, exit 2.

Real: Python's standard library text around the planted rows, the JSON/UTF-8 decoders, the chat
templates through transformers, and `python -m kubetrain_trainer preprocess` as a subprocess for
the exit code. Emulated: nothing; MAX_RECORD_BYTES is lowered in-process so an over-long line
costs kilobytes instead of 32 MiB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetrain_trainer.preprocess import readers
from kubetrain_trainer.stage import InvalidInput
from preprocess_support import (
    config,
    conversations,
    docs,
    preference_rows,
    run_cli,
    run_stage,
    write_jsonl,
)


def planted_file(
    path: Path, good: list[bytes], bad: dict[str, list[bytes]]
) -> dict[str, list[int]]:
    """Good rows with the bad ones interleaved; CRLF endings, a BOM and blank lines thrown in.

    Returns the line numbers of the bad rows by reason.
    """
    lines, where = [], {}
    planted = [(reason, row) for reason, rows in bad.items() for row in rows]
    step = max(1, len(good) // (len(planted) + 1))
    for i, row in enumerate(good):
        lines.append(row)
        if i % step == step - 1 and planted:
            reason, bad_row = planted.pop(0)
            lines.append(bad_row)
            where.setdefault(reason, []).append(len(lines))
        if i % 7 == 3:
            lines.append(b"   ")  # blank lines are not rows
    assert not planted
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    return where


def check(result: dict[str, Any], path: Path, where: dict[str, list[int]], good: int) -> None:
    expected = {reason: len(lines) for reason, lines in where.items()}
    assert result["rejected"] == expected
    assert result["accepted"] == good
    assert result["rowsRead"] == good + sum(expected.values())
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    for reason, lines in where.items():
        assert manifest["counts"]["firstRejected"][reason] == [f"{path}:{n}" for n in lines]


def dumps(rows: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


LONG = b'{"text": "' + b"x" * 9000 + b'"}'


def test_text_rows_of_every_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 8192)
    good = dumps([{"text": t} for t in docs(100_000) if len(t) < 3000])
    bad = {
        "invalidJson": [b'{"text": "cut', b"not json"],
        "invalidUtf8": [b'{"text": "caf\xe9"}', b'{"text": "\xff\xfe"}'],
        "wrongType": [b'{"text": 12}', b'["a", "list"]', b'"a string"'],
        "missingField": [b'{"body": "x"}', b'{"text": null}'],
        "emptyText": [b'{"text": ""}', b'{"text": " \\n\\t "}'],
        "tooLong": [LONG],
    }
    path = tmp_path / "planted.jsonl"
    where = planted_file(path, good, bad)
    result = run_stage(config(tmp_path, [str(path)], maxRejectedFraction=0.2), tmp_path / "w")
    check(result, path, where, len(good))


def test_chat_rows_of_every_reason(tmp_path: Path) -> None:
    good_rows = conversations(40)
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    huge = {"role": "assistant", "content": " ".join(docs()[:40])}
    bad = {
        "invalidJson": [b'{"messages": ['],
        "wrongType": [
            *dumps([{"messages": "hi"}, {"messages": [user, {**answer, "content": 5}]}]),
            b'{"messages": [1, 2]}',
        ],
        "missingField": dumps([{"conversation": [user, answer]}, {"messages": [{"role": "user"}]}]),
        "emptyText": dumps([{"messages": []}, {"messages": [user, {**answer, "content": "  "}]}]),
        "badRoles": dumps(
            [
                {"messages": [user, user, answer]},
                {"messages": [user]},
                {"messages": [answer, user, answer]},
                {"messages": [{"role": "tool", "content": "x"}, answer]},
                {"messages": [{"role": "system", "content": "s"}] * 2 + [user, answer]},
            ]
        ),
        "tooLong": dumps([{"messages": [user, huge]}]),
    }
    path = tmp_path / "chat.jsonl"
    where = planted_file(path, dumps(good_rows), bad)
    cfg = config(tmp_path, [str(path)], format="chat", chatTemplate="chatml", blockSize=1024)
    result = run_stage({**cfg, "maxRejectedFraction": 0.5}, tmp_path / "w")
    check(result, path, where, len(good_rows))


def test_preference_rows_of_every_reason(tmp_path: Path) -> None:
    good_rows = preference_rows(30)
    ok = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad = {
        "missingField": dumps([{"prompt": "q", "chosen": "a"}, {**ok, "prompt": None}]),
        "wrongType": dumps([{**ok, "chosen": 5}, {**ok, "prompt": 7}]),
        "badRoles": dumps(
            [
                {
                    **ok,
                    "prompt": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ],
                },
                {**ok, "chosen": [{"role": "user", "content": "a"}]},
            ]
        ),
        "emptyText": dumps([{**ok, "chosen": ""}, {**ok, "prompt": "   "}]),
        "tooLong": dumps([{**ok, "prompt": " ".join(docs()[:40])}]),
    }
    path = tmp_path / "pref.jsonl"
    where = planted_file(path, dumps(good_rows), bad)
    cfg = config(tmp_path, [str(path)], format="preference", chatTemplate="tulu", blockSize=512)
    result = run_stage({**cfg, "maxRejectedFraction": 0.5}, tmp_path / "w")
    check(result, path, where, len(good_rows))


def test_above_the_threshold_the_stage_exits_2_and_publishes_nothing(tmp_path: Path) -> None:
    good = [{"text": t} for t in docs(40_000)]
    rows: list[dict[str, Any]] = [*good[:50], *({"text": ""} for _ in range(3)), *good[50:]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = config(tmp_path, [str(path)], maxRejectedFraction=0.01)
    done = run_cli(cfg, tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"emptyText: 3 (first at {path}:51, {path}:52, {path}:53)" in done.stderr
    assert "above maxRejectedFraction 1.00%" in done.stderr
    result = json.loads((tmp_path / "work" / "result-preprocess.json").read_text())
    assert result["ok"] is False and result["exitCode"] == 2
    assert result["rejected"] == {"emptyText": 3}
    published = [
        p for p in (tmp_path / "cache" / "datasets").iterdir() if not p.name.startswith(".")
    ]
    assert published == [] and not (tmp_path / "out" / "dataset.json").exists()
    assert list((tmp_path / "cache" / "datasets").iterdir()) == [], "staging removed"

    accepted = run_stage({**cfg, "maxRejectedFraction": 0.1}, tmp_path / "w")
    assert accepted["rejected"] == {"emptyText": 3}
    with pytest.raises(InvalidInput, match="above maxRejectedFraction"):
        run_stage(cfg, tmp_path / "w")  # a cache hit is held to the threshold too


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "broken.json",
            b'[{"text": "a"},\n{"text": "b"\n{"text": "c"}]',
            "broken.json:3: invalid JSON",
        ),
        ("trailing.json", b'[{"text": "a"}] []', "unexpected content"),
        ("table.csv", b"text\na\n", "cannot tell how to read"),
    ],
)
def test_unreadable_files_fail_naming_the_place(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InvalidInput, match=message):
        run_stage(config(tmp_path, [str(tmp_path / name)]), tmp_path / "w")


def test_config_problems_fail_before_any_work(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    with pytest.raises(InvalidInput, match="no such file"):
        run_stage(config(tmp_path, [str(tmp_path / "missing.jsonl")]), tmp_path / "w")
    with pytest.raises(InvalidInput, match=r"\.txt files hold plain documents"):
        run_stage(config(tmp_path, [str(text)], format="chat"), tmp_path / "w")
    with pytest.raises(InvalidInput, match="keep one of them"):
        cfg = config(tmp_path, [str(text)], validation=[str(text)], validationFraction=0.1)
        run_stage(cfg, tmp_path / "w")
    trained = {"train": {"vocabSize": 600, "specialTokens": ["<|endoftext|>"]}}
    with pytest.raises(InvalidInput, match="no chat template"):
        cfg = config(tmp_path, [str(tmp_path / "c.jsonl")], format="chat", tokenizer=trained)
        (tmp_path / "c.jsonl").write_text("{}\n")
        run_stage(cfg, tmp_path / "w")
