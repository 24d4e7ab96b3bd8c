"""Every train and sanity stage reports its measured peak memory beside the memory model's
estimate, in its result and in its Prometheus series.

Real: the train stage in this process (HF Trainer on CPU, a tiny Llama built from its config),
the process's own peak resident set size (getrusage), the memory model of kubetrain_contract, the
trainer's Prometheus registry read with `get_sample_value`. Emulated: nothing; GPUs are absent,
so the CUDA figures are checked in test_train_gpu.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubetrain_contract import memory
from kubetrain_contract import metrics as names
from kubetrain_trainer import train
from trainer_support import Assets, train_config


def setup_of(config: train.TrainConfig, block_size: int) -> memory.Setup:
    """The memory model's view of the tiny CPU run (the plan writes this for a real stage)."""
    t = config.training
    return memory.Setup(
        stage=config.stage,
        where="spec",
        mode="train",
        method=config.method,
        adapter="none",
        lora_r=0,
        target_modules=(),
        precision=t.precision,
        weight_precision="fp32",
        optimizer=t.optimizer,
        zero_stage=0,
        offload=False,
        world_size=1,
        procs_per_node=1,
        micro_batch_size=t.micro_batch_size,
        block_size=block_size,
        gradient_checkpointing=t.gradient_checkpointing,
        attention="sdpa",
        compile=False,
        reference="none",
        gpu=False,
    )


def test_a_cpu_sanity_rung_reports_peak_rss_beside_the_estimate(
    assets: Assets, tmp_path: Path
) -> None:
    config = train_config(
        assets.text(),
        tmp_path / "out",
        stage="sanity",
        sanity={"minLossDrop": 0.0, "maxGradNorm": 1e6},
        training={"maxSteps": 6, "loggingSteps": 3},
    )
    session = train.prepare(config, tmp_path / "work")
    shape = memory.ModelShape.from_hf_config(session.trainer.model.config.to_dict())
    session.memory_estimate = memory.estimate(shape, setup_of(config, session.dataset.block_size))
    parameter_bytes = sum(p.numel() * p.element_size() for p in session.trainer.model.parameters())
    result = session.train()

    # The process holds at least its weights; no process here holds more than the machine has.
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert parameter_bytes <= result["memoryPeakRssBytes"] <= physical
    assert result["memoryPeakAllocatedBytes"] is None
    assert result["memoryPeakReservedBytes"] is None
    assert result["deviceMemoryBytes"] is None
    assert result["memoryEstimateBytes"] == session.memory_estimate.total > parameter_bytes
    assert result["tokensPerSecond"] > 0

    registry, run = session.metrics.registry, {"run": "t"}
    rss = registry.get_sample_value(names.TRAIN_MEMORY_PEAK, {**run, "kind": "rss"})
    assert rss is not None and parameter_bytes <= rss <= result["memoryPeakRssBytes"]
    assert registry.get_sample_value(names.TRAIN_MEMORY_ESTIMATE, run) == (
        session.memory_estimate.total
    )
    # CPU: no allocator peaks and no device total are exported, rather than zeros.
    assert registry.get_sample_value(names.TRAIN_MEMORY_PEAK, {**run, "kind": "allocated"}) is None
    assert registry.get_sample_value(names.TRAIN_DEVICE_MEMORY, run) is None


def test_a_run_without_an_estimate_reports_null_and_exports_none(
    assets: Assets, tmp_path: Path
) -> None:
    config = train_config(assets.text(), tmp_path / "out", training={"maxSteps": 2})
    session = train.prepare(config, tmp_path / "work")
    assert session.memory_estimate is not None  # the device check keeps it on CPU too
    # As when the memory model cannot count the model (the device check warns and goes on).
    session.memory_estimate = None
    result = session.train()
    assert result["memoryEstimateBytes"] is None and result["memoryPeakRssBytes"] > 0
    assert (
        session.metrics.registry.get_sample_value(names.TRAIN_MEMORY_ESTIMATE, {"run": "t"}) is None
    )
