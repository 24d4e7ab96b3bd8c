"""Exit codes of the `kubetrain` CLI (docs/cli.md), apart from argparse's 2 for usage errors.

The stages' own codes (kubetrain_contract.exit_codes; docs/architecture.md) are mapped onto these
by `kubetrain run`, so a script can tell the cases apart.
"""

from kubetrain_contract import exit_codes as stage

OK = 0
INVALID = 1
"""A TrainingRun (or a stage's input data) is invalid: fix it, retrying will not help."""
USAGE = 2
"""argparse's usage error."""
UNHEALTHY = 3
"""Training was unhealthy: NaN/Inf loss, a failed sanity rung, perplexity above maxPerplexity."""
FAILED = 4
"""A stage failed otherwise; see its log. Running the same command again resumes."""
TERMINATED = 143
"""Stopped (Ctrl-C) after a checkpoint; running the same command again resumes."""

#: A stage's exit code (the stage contract) → the CLI's.
FROM_STAGE = {
    stage.EXIT_OK: OK,
    stage.EXIT_INVALID: INVALID,
    stage.EXIT_UNHEALTHY: UNHEALTHY,
    stage.EXIT_TERMINATED: TERMINATED,
}


def from_stage(code: int) -> int:
    """Any other stage code (a retryable one included) is FAILED: running again resumes."""
    return FROM_STAGE.get(code, FAILED)
