"""Test-only entry point: the train stage exactly as `python -m kubetrain_trainer train` runs it
(`train.prepare` then `Session.train`), plus a record of what this rank held of the model and the
optimizer at the end of training, written to `<workdir>/probe-rank-<rank>.json`:

    torchrun --standalone --nproc_per_node 2 tests/support/zero_probe.py --config F --workdir W

`parameters` maps each parameter to [elements of this rank's partition, elements of the full
tensor, elements materialised in `param.data`]. DeepSpeed ZeRO-3 keeps the partition in
`ds_tensor` and the full size in `ds_numel`; between forward passes `param.data` is released
(empty) — except for "persistent" parameters below `stage3_param_persistence_threshold`, which
stay whole on every rank although they have a partition too. Without ZeRO-3 all three are equal.
`optimizerElements` counts the fp32 master elements this rank's optimizer steps (ZeRO-1/2/3 hold
a partition, DDP all of them); `cpuOffload` whether DeepSpeed's ZeRO optimizer keeps that
partition in host memory and steps it there. `processGroupAfterStage`: whether the process group
was still up when the stage returned (it must not be). Read by
tests/trainer/test_train_distributed.py and tests/trainer/test_train_optimizers.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from kubetrain_trainer import train
from kubetrain_trainer.config import TrainConfig, load_stage_config
from kubetrain_trainer.stage import setup_logging


class Probe(TrainerCallback):  # type: ignore[misc]
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        parameters = {
            name: [
                int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel()),
                int(getattr(p, "ds_numel", p.numel())),
                int(p.data.numel()),
            ]
            for name, p in model.named_parameters()
        }
        elements, holder = master_elements(optimizer)
        self.path.write_text(
            json.dumps(
                {
                    "parameters": parameters,
                    "optimizerElements": elements,
                    "optimizer": holder,
                    "cpuOffload": cpu_offload(optimizer),
                }
            ),
            encoding="utf-8",
        )


#: Where DeepSpeed's ZeRO optimizers keep this rank's fp32 master partition (stage 1/2, stage 3).
#: Stage 3 empties its torch optimizer's param_groups between steps, so ask the ZeRO level.
PARTITIONS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def master_elements(optimizer: Any) -> tuple[int, str]:
    """(fp32 master elements this rank steps, what held them), unwrapping accelerate's and
    DeepSpeed's optimizer wrappers down to torch's optimizer."""
    while True:
        for attr in PARTITIONS:
            groups = getattr(optimizer, attr, None)
            if groups is not None:
                return sum(int(t.numel()) for t in groups), f"{type(optimizer).__name__}.{attr}"
        if not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return sum(int(p.numel()) for p in params), type(optimizer).__name__


def cpu_offload(optimizer: Any) -> bool:
    """DeepSpeed's ZeRO-1/2 optimizer's own flag, found under accelerate's wrapper."""
    while not hasattr(optimizer, "cpu_offload") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return bool(getattr(optimizer, "cpu_offload", False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    setup_logging()
    config = load_stage_config(args.config)
    assert isinstance(config, TrainConfig)
    session = train.prepare(config, args.workdir)
    rank = int(os.environ.get("RANK", 0))
    probe = args.workdir / f"probe-rank-{rank}.json"
    session.trainer.add_callback(Probe(probe))
    session.train()
    # The stage leaves the process group itself (interpreter exit with Gloo threads can abort).
    record = json.loads(probe.read_text(encoding="utf-8"))
    record["processGroupAfterStage"] = torch.distributed.is_initialized()
    probe.write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main()
