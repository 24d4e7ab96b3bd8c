"""Where things are inside a stage's pod and its output: the operator renders them, the trainer
reads and writes them, and the operator reads back what the trainer wrote."""

from typing import Final

ATTEMPT_ENV: Final = "KUBETRAIN_ATTEMPT"
"""The env var that tells a training pod which attempt it belongs to: the trainer names it in
multi-node checkpoint marks, so a half-written checkpoint of an older attempt is never taken."""

HUB_KERNELS_ENV: Final = "USE_HUB_KERNELS"
"""transformers' documented switch for kernels from the Hub: every stage runs with it set to `NO`
(the plan puts it in the pod, the trainer sets it in its own process), so no kernel code is
fetched at run time."""

PVC_MOUNT_ROOT: Final = "/mnt/pvc"
"""Where `pvc://CLAIM/path` is mounted in pods (`<root>/CLAIM/path`): the operator mounts claims
there and maps paths back to pvc:// URIs; the trainer resolves pvc:// URIs under it."""

CHECKPOINTS_DIR: Final = "checkpoints"
"""The folder of complete checkpoints under a run's output URI."""

CHECKPOINT_STEP_PREFIX: Final = "step-"


def checkpoint_name(step: int) -> str:
    """`step-00000500`: a complete checkpoint's folder; zero-padded so names sort by step."""
    return f"{CHECKPOINT_STEP_PREFIX}{step:08d}"


def checkpoint_path(step: int) -> str:
    """`checkpoints/step-00000500`, relative to the output URI: where status points users."""
    return f"{CHECKPOINTS_DIR}/{checkpoint_name(step)}"
