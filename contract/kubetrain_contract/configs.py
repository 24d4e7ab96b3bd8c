"""The stage config document's version: the operator writes it into every config, the trainer
refuses any other, so an operator and a trainer image from different releases fail loudly."""

from typing import Final

STAGE_API_VERSION: Final = "kubetrain.dev/stage-v1"
"""`apiVersion` of every stage config (`python -m kubetrain_trainer STAGE --config FILE`)."""
