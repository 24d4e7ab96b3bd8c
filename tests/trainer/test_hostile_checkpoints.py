"""A checkpoint someone else wrote into the output is refused before any of it is unpickled.

Real: the trainer's checkpoint writer (`checkpoint.files_of`, `write_marker`) and its resume
(`checkpoint.resume_point`, which verifies), and DeepSpeed's own `TorchCheckpointEngine.load`
(`weights_only=False`), applied to every ZeRO optimizer shard of the checkpoint resume chose, as
DeepSpeed's `load_checkpoint` globs them. Emulated: the checkpoints' contents — small tensors
under the file names a ZeRO-2 checkpoint has, instead of a trained run's (which would make this
test slow); the marker over them is the trainer's own.
"""

from __future__ import annotations

import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetrain_contract.layout import checkpoint_name
from kubetrain_trainer import checkpoint
from kubetrain_trainer.config import AWS_S3

SHARD = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickled, it creates `path`: proof that a pickle's code ran (no shell needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (pathlib.Path.touch, (self.path,))


def _write(staging: Path, step: int) -> Path:
    """A complete checkpoint of one ZeRO-2 process, marked as the trainer marks one."""
    directory = staging / checkpoint_name(step)
    shards = directory / f"global_step{step}"
    shards.mkdir(parents=True)
    torch.save(
        {"optimizer_state_dict": {"step": torch.tensor(step)}}, shards / SHARD.format(rank=0)
    )
    torch.save({"module": {"w": torch.zeros(4)}}, shards / "mp_rank_00_model_states.pt")
    (directory / "latest").write_text(f"global_step{step}", encoding="utf-8")
    checkpoint.write_marker(directory, {"step": step, "files": checkpoint.files_of(directory)})
    return directory


@pytest.mark.parametrize("attack", ["replaced", "planted"])
def test_a_tampered_checkpoint_is_refused_before_its_pickle_runs(
    tmp_path: Path, attack: str
) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    staging, ran = tmp_path / "checkpoints", tmp_path / "payload-ran"
    _write(staging, 10)
    newest = _write(staging, 20)
    # replaced: the shard the marker lists; planted: a shard it does not list, which DeepSpeed's
    # glob of *_optim_states.pt would load all the same.
    torch.save(
        {"x": Payload(ran)}, newest / "global_step20" / SHARD.format(rank=int(attack == "planted"))
    )

    resumed = checkpoint.resume_point(
        staging, None, AWS_S3, leader=True, is_rank_zero=True, nodes=1
    )
    for shard in sorted(resumed.rglob(SHARD.format(rank="*"))) if resumed else []:
        TorchCheckpointEngine().load(str(shard), map_location="cpu")  # what DeepSpeed does next

    assert not ran.exists(), "the checkpoint's pickle ran"
    assert resumed == staging / checkpoint_name(10)  # the previous complete one
