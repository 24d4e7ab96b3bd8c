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

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from kubetrain_trainer import __main__ as entry
from kubetrain_trainer.metrics import PreprocessMetrics
from kubetrain_trainer.preprocess import pipeline, readers
from kubetrain_trainer.preprocess.rows import FIRST_PER_REASON, REASONS
from kubetrain_trainer.stage import RESULT_LIMIT, InvalidInput
from preprocess_support import (
    EOS,
    column,
    config,
    conversations,
    docs,
    load,
    preference_rows,
    run_cli,
    run_stage,
    tokenizer_dir,
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


def at(path: Path, where: dict[str, list[int]]) -> dict[str, list[str]]:
    """Line (or row) numbers by reason → the `file:line` locations the stage reports."""
    return {reason: [f"{path}:{n}" for n in lines] for reason, lines in where.items()}


def check(
    result: dict[str, Any],
    metrics: PreprocessMetrics,
    where: dict[str, list[str]],
    good: int,
) -> None:
    """Exact counts per reason in the result, the manifest and the metrics; the locations."""
    expected = {reason: len(places) for reason, places in where.items()}
    assert result["rejected"] == expected
    assert result["accepted"] == good
    assert result["rowsRead"] == good + sum(expected.values())
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rejected"] == expected
    for reason, places in where.items():
        assert counts["firstRejected"][reason] == places[:FIRST_PER_REASON]
        assert result["firstRejected"][reason] == places[: pipeline.RESULT_FIRST]

    def counter(result: str, reason: str) -> float:
        labels = {"run": "test-run", "result": result, "reason": reason}
        return metrics.registry.get_sample_value("kubetrain_preprocess_rows_total", labels) or 0

    for reason in REASONS:  # every reason, the absent ones at 0
        assert counter("rejected", reason) == counts["rejected"].get(reason, 0), reason
    assert counter("accepted", "") == counts["accepted"]


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
    metrics = PreprocessMetrics("test-run")
    cfg = config(tmp_path, [str(path)], maxRejectedFraction=0.2)
    check(run_stage(cfg, tmp_path / "w", metrics), metrics, at(path, where), len(good))


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
    metrics = PreprocessMetrics("test-run")
    result = run_stage({**cfg, "maxRejectedFraction": 0.5}, tmp_path / "w", metrics)
    check(result, metrics, at(path, where), len(good_rows))


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
    metrics = PreprocessMetrics("test-run")
    result = run_stage({**cfg, "maxRejectedFraction": 0.5}, tmp_path / "w", metrics)
    check(result, metrics, at(path, where), len(good_rows))


def clean_paragraphs(max_bytes: int) -> list[str]:
    """Corpus paragraphs that stay one document in a .txt (no whitespace-only line inside)."""
    return [
        t for t in docs(max_bytes) if len(t) < 3000 and all(line.strip() for line in t.split("\n"))
    ]


def test_txt_paragraphs_of_every_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 8192)
    good = [t.encode() for t in clean_paragraphs(100_000)]
    bad = {
        "invalidUtf8": [
            b"A paragraph saved as Latin-1:\nthe caf\xe9 cr\xe8me line",
            b"\xff\xfeU\x00T\x00F\x00-\x001\x006\x00",
            b"fine first line\nthen a lone continuation byte \x80 here",
        ],
        # Unicode whitespace is not a blank line to the splitter (it looks at ASCII whitespace),
        # so it makes a paragraph, which validation finds empty.
        "emptyText": ["\u00a0\u00a0".encode(), "\u3000\n\u2003 \u2009".encode()],
        "tooLong": [b"x" * 9000, b"\n".join([b"y" * 3000] * 4)],
    }
    planted = [(reason, para) for reason, paras in bad.items() for para in paras]
    separators = [[b""], [b"", b""], [b"   ", b"\t"], [b"\x0c"], [b"", b" \t ", b""]]
    lines: list[bytes] = [b"", b"  "]  # leading blank lines are not rows either
    where: dict[str, list[int]] = {}
    step = len(good) // (len(planted) + 1)
    for i, para in enumerate(good):
        lines += para.split(b"\n") + separators[i % len(separators)]
        if i % step == step - 1 and planted:
            reason, bad_para = planted.pop(0)
            where.setdefault(reason, []).append(len(lines) + 1)  # a paragraph's first line
            lines += bad_para.split(b"\n") + separators[(i + 2) % len(separators)]
    assert not planted
    path = tmp_path / "planted.txt"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n\r\n\r\n")
    metrics = PreprocessMetrics("test-run")
    cfg = config(tmp_path, [str(path)], maxRejectedFraction=0.2)
    result = run_stage(cfg, tmp_path / "w", metrics)
    check(result, metrics, at(path, where), len(good))

    manifest, table = load(result)
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    pairs = zip(column(table, "input_ids"), column(table, "labels"), strict=True)
    ids = [i for row, labels in pairs for i, label in zip(row, labels, strict=True) if label >= 0]
    documents, current = [], []
    for token in ids:
        if token == tok.token_to_id(EOS):
            documents.append(tok.decode(current, skip_special_tokens=False))
            current = []
        else:
            current.append(token)
    assert documents == [t.decode() for t in good], "CRLF normalised, the rest kept as it was"
    assert manifest["counts"]["documents"] == len(good)


def test_parquet_rows_of_every_reason(tmp_path: Path) -> None:
    good = clean_paragraphs(60_000)
    mixed: list[str | None] = []
    where: dict[str, list[str]] = {}
    mixed_path = tmp_path / "1-mixed.parquet"  # numbered: the glob below reads them in this order
    planted = {5: None, 9: "", 14: " \n\t ", 20: None, 27: "\u3000", 33: None}
    for text in good[:40]:
        if len(mixed) + 1 in planted:
            value = planted[len(mixed) + 1]
            reason = "missingField" if value is None else "emptyText"
            mixed.append(value)
            where.setdefault(reason, []).append(f"{mixed_path}:{len(mixed)}")
        mixed.append(text)
    pq.write_table(
        pa.table({"text": pa.array(mixed, pa.string()), "id": range(len(mixed))}), mixed_path
    )
    numbers_path, lists_path, binary_path, absent_path = (
        tmp_path / f"{name}.parquet" for name in ("2-numbers", "3-lists", "4-binary", "5-absent")
    )
    pq.write_table(pa.table({"text": pa.array(range(7), pa.int64())}), numbers_path)
    lists = [["a", "b"], None, [], ["c"]]
    pq.write_table(pa.table({"text": pa.array(lists, pa.list_(pa.string()))}), lists_path)
    pq.write_table(pa.table({"text": pa.array([b"caf\xe9", b"ok"], pa.binary())}), binary_path)
    pq.write_table(pa.table({"body": good[40:43]}), absent_path)
    wrong = [f"{numbers_path}:{n}" for n in range(1, 8)]
    wrong += [f"{lists_path}:{n}" for n in (1, 3, 4)] + [f"{binary_path}:1", f"{binary_path}:2"]
    where["wrongType"] = wrong
    where["missingField"] += [f"{lists_path}:2"] + [f"{absent_path}:{n}" for n in (1, 2, 3)]
    metrics = PreprocessMetrics("test-run")
    # One source (the limit applies per source): every Parquet file written above.
    cfg = config(tmp_path, [str(tmp_path / "*.parquet")], maxRejectedFraction=0.6)
    result = run_stage(cfg, tmp_path / "w", metrics)
    check(result, metrics, where, len(good[:40]))
    assert result["rejected"] == {"wrongType": 12, "missingField": 7, "emptyText": 3}


@pytest.mark.slow  # starts a stage or operator process
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


@pytest.mark.slow  # starts a stage or operator process
def test_the_result_stays_valid_json_under_4_kib_with_many_rejected_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 bad rows of each of 6 reasons in a file with a 300-character path: the result handed
    to write_result keeps at most RESULT_FIRST locations per reason, fewer if they would not
    fit, and is valid JSON below 4 KiB as it is (nothing for write_result to cut)."""
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 8192)
    monkeypatch.setattr(entry, "setup_logging", lambda: None)  # keep pytest's log capture
    sent: list[dict[str, Any]] = []
    real_write_result = entry.write_result

    def recording_write_result(stage: str, result: dict[str, Any], workdir: Path) -> Path:
        sent.append(result)
        return real_write_result(stage, result, workdir)

    monkeypatch.setattr(entry, "write_result", recording_write_result)
    deep = tmp_path / ("a-rather-long-directory-name-" * 5) / ("and-another-level-" * 5)
    deep.mkdir(parents=True)
    path = deep / "many-bad-rows.jsonl"
    assert len(str(path)) > 300
    good = dumps([{"text": t} for t in docs(100_000) if len(t) < 3000])
    one_of_each = {
        "invalidJson": b'{"text": "cut',
        "invalidUtf8": b'{"text": "caf\xe9"}',
        "wrongType": b'{"text": 12}',
        "missingField": b'{"body": "x"}',
        "emptyText": b'{"text": " "}',
        "tooLong": LONG,
    }
    where = planted_file(path, good, {reason: [row] * 12 for reason, row in one_of_each.items()})
    locations = at(path, where)

    def run(fraction: float) -> tuple[int, dict[str, Any], str]:
        cfg = config(tmp_path, [str(path)], maxRejectedFraction=fraction)
        config_file = tmp_path / f"config-{fraction}.json"
        config_file.write_text(json.dumps(cfg))
        sent.clear()
        code = entry.main(["preprocess", "--config", str(config_file), "--workdir", str(deep)])
        assert len(sent) == 1
        text = (deep / "result-preprocess.json").read_text()
        assert json.loads(text) == sent[0], "written as sent: nothing truncated"
        return code, sent[0], json.dumps(sent[0], separators=(",", ":"))

    code, result, compact = run(0.9)
    assert code == 0 and result["ok"] is True
    assert len(compact.encode()) <= pipeline.RESULT_BUDGET < RESULT_LIMIT
    assert result["rejected"] == {reason: 12 for reason in where}
    manifest = json.loads((Path(result["uri"]) / "manifest.json").read_text())
    kept = {len(v) for v in result["firstRejected"].values()}
    assert len(kept) == 1 and 1 <= kept.pop() < pipeline.RESULT_FIRST, "fitted: fewer per reason"
    for reason, places in locations.items():
        assert manifest["counts"]["firstRejected"][reason] == places[:FIRST_PER_REASON]
        assert len(manifest["counts"]["firstRejected"][reason]) == FIRST_PER_REASON == 10
        assert result["firstRejected"][reason] == places[: len(result["firstRejected"][reason])]

    code, failed, compact = run(0.01)
    assert code == 2 and failed["ok"] is False and failed["exitCode"] == 2
    assert len(compact.encode()) <= RESULT_LIMIT and "truncated" not in failed
    assert failed["rejected"] == result["rejected"]
    for reason, places in locations.items():
        shown = failed["firstRejected"][reason]
        assert len(shown) <= pipeline.RESULT_FIRST and shown == places[: len(shown)]
        assert f"  {reason}: 12 (" in failed["error"]


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
