"""GPU-only behaviour: bf16 kernels, MFU and GPU memory gauges, 4-bit CUDA kernels, NCCL.

Real: an NVIDIA GPU, CUDA, NCCL, bitsandbytes' CUDA kernels, the train stage in this process (or
torchrun for NCCL). Emulated: nothing. Skipped where no GPU is visible (the CPU CI box); run them
on the device machine with `pytest -m gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetrain_trainer import train
from trainer_support import Assets, losses, torchrun, train_config, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_bf16_training_reports_mfu_and_memory(assets: Assets, tmp_path: Path) -> None:
    config = train_config(
        assets.text(), tmp_path / "out", training={"maxSteps": 30, "precision": "bf16"}
    )
    session = train.prepare(config, tmp_path / "work")
    result = session.train()
    total = torch.cuda.get_device_properties(session.trainer.args.device).total_memory
    assert result["deviceMemoryBytes"] == total
    assert 0 < result["memoryPeakAllocatedBytes"] <= result["memoryPeakReservedBytes"] < total
    assert result["memoryPeakRssBytes"] > 0
    got = losses(tmp_path / "work")
    assert got[30] < got[1]
    registry = session.metrics.registry
    mfu = registry.get_sample_value("kubetrain_train_mfu_ratio", {"run": "t"})
    if train.peak_flops(torch.cuda.get_device_name(), "bf16") is not None:
        assert mfu is not None and 0 < mfu < 1
    allocated = registry.get_sample_value(
        "kubetrain_gpu_memory_allocated_bytes", {"run": "t", "rank": "0"}
    )
    assert allocated is not None and allocated > 0
    for kind in ("allocated", "reserved"):
        peak = registry.get_sample_value(
            "kubetrain_train_memory_peak_bytes", {"run": "t", "kind": kind}
        )
        assert peak is not None and 0 < peak <= result[f"memoryPeak{kind.title()}Bytes"]
    device = registry.get_sample_value("kubetrain_train_device_memory_bytes", {"run": "t"})
    assert device == total


def test_qlora_trains_with_cuda_kernels(assets: Assets, tmp_path: Path) -> None:
    config = train_config(
        assets.chat(),
        tmp_path / "out",
        method="sft",
        model={"uri": str(assets.base_model())},
        adapter={"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
        training={"maxSteps": 10, "precision": "bf16", "learningRate": 2e-3},
    )
    train.run(config, tmp_path / "work")
    got = losses(tmp_path / "work")
    assert got[10] < got[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")
def test_nccl_ddp_on_two_gpus(assets: Assets, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "ddp.json",
        train_config(
            assets.text(),
            tmp_path / "out",
            training={"maxSteps": 10, "precision": "bf16"},
            distributed={"worldSize": 2},
        ),
    )
    done = torchrun(config, tmp_path / "work", env={"DS_ACCELERATOR": "cuda"})
    assert done.returncode == 0, done.stderr[-4000:]
    got = losses(tmp_path / "work")
    assert sorted(got) == list(range(1, 11)) and got[10] < got[1]


def test_the_device_check_refuses_what_cannot_fit_before_building_it(
    assets: Assets, tmp_path: Path
) -> None:
    """A 70B-shaped architecture: over any single GPU, refused with the operator's message
    before a single weight is built (building it would take minutes and run out of memory)."""
    from kubetrain_contract import memory
    from kubetrain_trainer.stage import InvalidInput

    huge = {"hiddenSize": 8192, "layers": 80, "heads": 64, "kvHeads": 8}
    huge |= {"intermediateSize": 28672, "contextLength": 128}
    config = train_config(
        assets.text(),
        tmp_path / "out",
        model={"architecture": huge},
        training={"maxSteps": 2, "precision": "bf16"},
        memory={"setup": {"gpu": True, "precision": "bf16"}},
    )
    with pytest.raises(InvalidInput) as refused:
        train.prepare(config, tmp_path / "work")
    setup = memory.Setup.from_dict(config.memory.setup)
    device = torch.cuda.get_device_properties(0)
    message = refused.value.message
    assert message.startswith(f"{setup.where}: {setup.stage} on 1 process(es) needs about")
    assert f"the GPU has {memory.gib(device.total_memory)} (the device: {device.name})" in message
    assert " — largest: " in message
    assert torch.cuda.memory_allocated() == 0  # nothing was put on the device


def test_the_device_check_lets_what_fits_load(assets: Assets, tmp_path: Path) -> None:
    config = train_config(
        assets.text(),
        tmp_path / "out",
        training={"maxSteps": 2, "precision": "bf16"},
        memory={"setup": {"gpu": True, "precision": "bf16"}},
    )
    session = train.prepare(config, tmp_path / "work")
    estimate = session.memory_estimate
    assert estimate is not None
    assert estimate.total <= torch.cuda.get_device_properties(0).total_memory
    assert session.train()["step"] == 2
