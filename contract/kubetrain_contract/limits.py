"""Bounds both sides enforce on a run's numbers: the API refuses a spec past them at admission,
and the trainer refuses a stage config past them at start-up, so a value the training libraries
cannot represent (a step count past int64 overflows in the trainer) is exit 2, never a retried
crash."""

from typing import Final

MAX_STEPS: Final = 10**9
"""Most optimizer steps of any step count (maxSteps, everySteps, evalSteps, loggingSteps, a rung's
steps): a billion steps is beyond any run, and far below where counters and schedules overflow."""
