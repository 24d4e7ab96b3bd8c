"""Progress a person reads, and the artifacts a run leaves: durations with hours, the input size
behind the preprocessing bar, a resumed stage's real step and total, model cards in final/ and
merged/ (base_model only for Hub ids), and output.maxPerplexity.

Real: the preprocess, train and merge stages (in this process, or through `__main__.main` for the
exit code), prometheus-client registries read with `get_sample_value`, huggingface_hub's model
card rendering, the tiny base model of the trainer tests. Emulated: nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kubetrain_contract.exit_codes import EXIT_UNHEALTHY
from kubetrain_trainer import card, train
from kubetrain_trainer.__main__ import main
from kubetrain_trainer.metrics import PreprocessMetrics
from preprocess_support import config, docs, run_stage, write_jsonl
from trainer_support import TINY, Assets, merge_config, train_config, write_config


def test_the_preprocessing_bar_knows_the_input_size(tmp_path: Path) -> None:
    parts = [
        write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": t} for t in docs()[i * 50 :][:50]])
        for i in range(2)
    ]
    metrics = PreprocessMetrics("test-run")
    run_stage(config(tmp_path, [str(p) for p in parts]), tmp_path / "w", metrics)
    total = sum(p.stat().st_size for p in parts)
    sample = metrics.registry.get_sample_value
    assert sample("kubetrain_preprocess_input_bytes", {"run": "test-run"}) == total
    assert sample("kubetrain_preprocess_read_bytes_total", {"run": "test-run"}) == total


@pytest.mark.slow
def test_a_resumed_stage_shows_its_step_and_total_before_training(
    assets: Assets, tmp_path: Path
) -> None:
    first = train_config(
        assets.text(), tmp_path / "out", training={"maxSteps": 5}, checkpoints={"everySteps": 5}
    )
    train.run(first, tmp_path / "work")
    again = train_config(
        assets.text(), tmp_path / "out", training={"maxSteps": 15}, checkpoints={"everySteps": 5}
    )
    session = train.prepare(again, tmp_path / "work2")
    assert session.metrics is not None
    sample = session.metrics.registry.get_sample_value
    assert sample("kubetrain_train_step", {"run": "t"}) == 5
    assert sample("kubetrain_train_total_steps", {"run": "t"}) == 15
    session.callbacks.ledger.close()
    session.callbacks.log.close()


def _front_matter(text: str) -> dict[str, object]:
    return dict(yaml.safe_load(text.split("---")[1]))


def test_final_holds_a_model_card_without_a_local_base_model(assets: Assets) -> None:
    final = assets.base_model()
    text = (final / "README.md").read_text()
    meta = _front_matter(text)
    assert "base_model" not in meta and "kubetrain" in meta["tags"]  # type: ignore[operator]
    complete = json.loads((final / "COMPLETE").read_text())
    assert "README.md" in complete["files"]


def test_base_model_is_set_only_for_hub_ids(tmp_path: Path) -> None:
    fields = {
        "run": "r",
        "summary": "s",
        "method": "sft",
        "adapter": "lora",
        "steps": 1,
        "dataset": "k",
        "train_tokens": 1,
        "block_size": 64,
        "perplexity": "2.0",
        "eval_tokens": 1,
        "precision": "bf16",
    }
    for base, expected in (
        ("hf://TinyOrg/tiny-llama@v1", "TinyOrg/tiny-llama"),
        ("s3://bucket/models/llama", None),
        ("/mnt/models/llama", None),
    ):
        meta = _front_matter(card.write(tmp_path, {**fields, "base": base}))
        assert meta.get("base_model") == expected, base


@pytest.mark.slow
def test_perplexity_above_max_perplexity_fails_the_merge_with_exit_3(
    assets: Assets, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(assets.base_model(), out / "final")
    # The base model was pretrained from an architecture: nothing to merge, only evaluated.
    config = merge_config(
        assets.text(),
        "unused",
        out,
        method="pretrain",
        model={"architecture": TINY},
        adapter={"type": "none"},
        merge=False,
        maxPerplexity=1.5,
    )
    path = write_config(tmp_path / "merge.json", config)
    code = main(["merge", "--config", str(path), "--workdir", str(tmp_path / "w")])
    assert code == EXIT_UNHEALTHY
    result = json.loads((tmp_path / "w" / "result-merge.json").read_text())
    assert result["reason"] == "PerplexityTooHigh" and result["maxPerplexity"] == 1.5
    assert result["perplexity"] > 1.5 and result["evalTokens"] > 0
    assert f"{result['perplexity']:.3f}" in result["error"]
    assert not (out / "merged").exists()


@pytest.mark.slow  # starts a stage or operator process
def test_the_bitsandbytes_cpu_kernel_warning_is_not_shown_at_stage_start() -> None:
    import subprocess
    import sys

    def stderr(code: str) -> str:
        argv = [sys.executable, "-c", code]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120).stderr

    message = "Failed to load CPU gemm_4bit_forward"
    assert message in stderr("import bitsandbytes")  # the control: bitsandbytes says it
    quiet = stderr(
        "from kubetrain_trainer.stage import setup_logging; setup_logging(); import bitsandbytes"
    )
    assert message not in quiet
