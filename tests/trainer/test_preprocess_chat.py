"""Chat and preference formats: masks checked against the template's own rendering, whole examples.

Real: conversations made of Python's standard library text, transformers' `apply_chat_template`
with `return_assistant_tokens_mask` (its own `{% generation %}` machinery) as the reference for
every label, the BPE tokenizer, best-fit packing into Arrow blocks. Emulated: nothing.
"""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetrain_trainer.preprocess.encode import IGNORE
from kubetrain_trainer.preprocess.tokenizer import TEMPLATES
from kubetrain_trainer.stage import InvalidInput
from preprocess_support import (
    column,
    config,
    conversations,
    load,
    preference_rows,
    run_stage,
    tokenizer_dir,
    write_jsonl,
)


def hf_tokenizer(template: str) -> Any:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    hf.chat_template = TEMPLATES[template]
    return hf


def check_chat_blocks(result: dict[str, Any], rows: list[dict[str, Any]], template: str) -> None:
    """Every example is whole in one block, with transformers' own assistant mask as labels."""
    hf = hf_tokenizer(template)
    expected: dict[str, tuple[list[int], list[int]]] = {}
    for row in rows:
        out = hf.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert any(out["assistant_masks"]), "the reference marks the answers"
        text = hf.apply_chat_template(row["messages"], tokenize=False)
        expected[text] = (out["input_ids"], out["assistant_masks"])
    manifest, table = load(result)
    pad = manifest["tokenizer"]["padTokenId"]
    seen: Counter[str] = Counter()
    blocks = zip(
        column(table, "input_ids"),
        column(table, "labels"),
        column(table, "position_ids"),
        strict=True,
    )
    for ids, labels, positions in blocks:
        assert len(ids) == len(labels) == len(positions) == manifest["blockSize"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for start, end in itertools.pairwise(starts):
            assert positions[start:end] == list(range(end - start))
            segment, segment_labels = ids[start:end], labels[start:end]
            if set(segment) == {pad}:
                assert end == len(ids) and set(segment_labels) == {IGNORE}, "padding is a tail"
                continue
            text = hf.decode(segment, skip_special_tokens=False)
            assert text in expected, "a block holds only whole conversations"
            reference_ids, mask = expected[text]
            assert segment == reference_ids
            assert segment_labels == np.where(mask, reference_ids, IGNORE).tolist()
            seen[text] += 1
    assert sorted(seen.values()) == [1] * len(expected), "every conversation exactly once"
    assert manifest["counts"]["accepted"] == len(rows)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_labels_are_the_templates_own_assistant_mask(tmp_path: Path, template: str) -> None:
    rows = conversations(60)
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = config(tmp_path, [str(source)], format="chat", chatTemplate=template, blockSize=1024)
    result = run_stage(cfg, tmp_path / "w")
    check_chat_blocks(result, rows, template)
    assert result["blocks"] < len(rows), "several conversations share a block"
    assert result["paddingFraction"] < 0.25, "best fit leaves little padding"


def test_a_model_template_without_generation_markers(tmp_path: Path) -> None:
    """The tokenizer's own template (chatml without markers) gives the same labels."""
    rows = conversations(30)
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = run_stage(
        config(tmp_path, [str(source)], format="chat", blockSize=1024), tmp_path / "w"
    )
    check_chat_blocks(result, rows, "chatml")


def test_a_template_that_is_not_prefix_stable_stops_the_stage(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir(), model)
    (model / "chat_template.jinja").write_text(
        "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    source = write_jsonl(tmp_path / "chat.jsonl", conversations(3))
    cfg = config(tmp_path, [str(source)], format="chat", tokenizer={"uri": str(model)})
    with pytest.raises(InvalidInput, match=rf"{source}:1: cannot mask this row"):
        run_stage({**cfg, "blockSize": 1024}, tmp_path / "w")


@pytest.mark.parametrize("template", ["tulu", "llama3"])
def test_preference_pairs_share_the_prompt_tokens(tmp_path: Path, template: str) -> None:
    rows = preference_rows(40)
    source = write_jsonl(tmp_path / "pref.jsonl", rows)
    cfg = config(tmp_path, [str(source)], format="preference", chatTemplate=template)
    result = run_stage({**cfg, "blockSize": 1024}, tmp_path / "w")
    assert result["accepted"] == len(rows) == result["trainRows"]
    hf = hf_tokenizer(template)
    _, table = load(result)
    prompts = column(table, "prompt_ids")
    answers = {name: column(table, f"{name}_ids") for name in ("chosen", "rejected")}
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        head = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert hf.decode(prompts[i], skip_special_tokens=False) == head
        for name, answer in answers.items():
            conversation = [*messages, {"role": "assistant", "content": row[name]}]
            full = hf.apply_chat_template(conversation, tokenize=False)
            assert hf.decode(prompts[i] + answer[i], skip_special_tokens=False) == full
            whole = hf(full, add_special_tokens=False)["input_ids"]
            assert whole[: len(prompts[i])] == prompts[i], f"{name} starts with the shared prompt"
