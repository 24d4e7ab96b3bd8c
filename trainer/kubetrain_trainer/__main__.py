"""`python -m kubetrain_trainer <stage> --config FILE [--workdir DIR]` — what the pods run.

The stage config is the whole interface (see `config.py`); heavy libraries are imported only by the
stage that needs them. A stage process dies with the process that launched it (`kubetrain run`,
torchrun): see `lifetime.die_with_parent`. No stage runs code from the Hugging Face Hub: see
`refuse_hub_kernels`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from kubetrain_contract.exit_codes import EXIT_INVALID
from kubetrain_contract.layout import HUB_KERNELS_ENV
from kubetrain_trainer import lifetime
from kubetrain_trainer.config import ConfigError, load_stage_config
from kubetrain_trainer.stage import (
    StageFailure,
    setup_logging,
    write_result,
)

#: stage name → module with `run(config, workdir) -> dict` (the result summary).
STAGES = {
    "preprocess": "kubetrain_trainer.preprocess",
    "train": "kubetrain_trainer.train",
    "merge": "kubetrain_trainer.merge",
}
log = logging.getLogger("kubetrain_trainer")
#: The Hub loaders of the `kernels` package: each downloads a kernel's code and imports it.
HUB_KERNEL_LOADERS = ("get_kernel", "get_locked_kernel", "install_kernel")


def _refused(repo_id: str, *args: object, **kwargs: object) -> NoReturn:
    raise RuntimeError(
        f"kernel {repo_id!r}: kubetrain loads no kernel from the Hugging Face Hub at run time; "
        "kernels come only from the trainer image: build it into the image to use it"
    )


def refuse_hub_kernels() -> None:
    """Kernels come only from the image: no stage fetches code from the Hub and runs it.

    transformers honours its documented switch `USE_HUB_KERNELS` (the operator's plan sets it in
    the pod too). bitsandbytes 0.50 calls `kernels.get_kernel` when its CPU backend is imported
    on AVX512-BF16 machines and has no switch, nor has `kernels` (offline mode still loads from
    the Hub cache after a skipped trust check), so its Hub loaders refuse here, before a stage
    imports either library; bitsandbytes then uses its own CPU code. Runs cannot opt in yet.
    """
    os.environ[HUB_KERNELS_ENV] = "NO"
    import kernels

    for name in HUB_KERNEL_LOADERS:
        setattr(kernels, name, _refused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetrain_trainer")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", required=True, type=Path, help="stage config JSON")
    parser.add_argument(
        "--workdir", type=Path, default=Path.cwd(), help="where result-<stage>.json is written"
    )
    args = parser.parse_args(argv)
    lifetime.die_with_parent()
    setup_logging()
    refuse_hub_kernels()
    try:
        config = load_stage_config(args.config)
    except ConfigError as error:
        log.error("%s", error)
        write_result(
            args.stage, {"stage": args.stage, "ok": False, "error": str(error)}, args.workdir
        )
        return EXIT_INVALID
    stage_name = config.stage if config.stage != "sanity" else "train"
    if stage_name != args.stage:
        message = f"{args.config}: stage: the config is for {config.stage!r}, not {args.stage!r}"
        log.error("%s", message)
        return EXIT_INVALID
    try:
        from kubetrain_trainer import storage

        storage.check_config(config)  # credential URIs and unsafe endpoints: before any I/O
        module = importlib.import_module(STAGES[args.stage])
        result = module.run(config, args.workdir)
    except StageFailure as failure:
        log.error("%s", failure.message)
        write_result(
            config.stage,
            {
                "stage": config.stage,
                "ok": False,
                "exitCode": failure.exit_code,
                "error": failure.message,
                **failure.details,
            },
            args.workdir,
        )
        return failure.exit_code
    write_result(config.stage, {"stage": config.stage, "ok": True, **result}, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
