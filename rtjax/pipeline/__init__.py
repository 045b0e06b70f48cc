"""The compression pipeline: registered stage types chained by a config's
`stages`, each from its parent's checkpoint to its own."""

from rtjax.pipeline import stages  # noqa: F401  (registers the stage types)
from rtjax.pipeline.registry import (StageType, register, stage_config,
                                     stage_type, stage_types)
from rtjax.pipeline.run import run_pipeline, validate

__all__ = ["StageType", "register", "run_pipeline", "stage_config",
           "stage_type", "stage_types", "validate"]
