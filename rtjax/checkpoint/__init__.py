"""Checkpoints that carry their own metadata: save, find, restore, and
rebuild a model (and its dataset) from a path alone; a stage's lifecycle
(finished or not, one complete step)."""

from rtjax.checkpoint.lifecycle import finished_stage, save_complete_step
from rtjax.checkpoint.load import (checkpoint_dataset, describe,
                                   load_checkpoint, model_bytes,
                                   model_from_spec, resolve, run_name)
from rtjax.checkpoint.stamp import SCHEMA_VERSION
from rtjax.checkpoint.store import RunCheckpoints, absolute
from rtjax.errors import CheckpointError

__all__ = ["CheckpointError", "RunCheckpoints", "SCHEMA_VERSION", "absolute",
           "checkpoint_dataset", "describe", "finished_stage",
           "load_checkpoint", "model_bytes", "model_from_spec", "resolve",
           "run_name", "save_complete_step"]
