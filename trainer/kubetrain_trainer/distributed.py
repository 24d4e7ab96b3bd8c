"""This process's place in a torchrun job, read once from the launcher's environment.

The stage's steps (refusals, checkpoint layout, resume) need the same few numbers; alone — run
by hand, without torchrun — a process is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from torchrun's environment (alone: rank 0 of 1)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node: int

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return cls(
            rank=rank,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=local_world,
            node=int(env.get("GROUP_RANK", rank // max(local_world, 1))),
        )

    @property
    def nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)
