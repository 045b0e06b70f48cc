"""Training: optax loop, orbax checkpoints, resume, preemption, NaN guard."""

from rtjax.train.checkpointing import (CheckpointError, RunCheckpoints,
                                       load_checkpoint)
from rtjax.train.metrics import MetricWriter, read_metrics
from rtjax.train.trainer import (NonFiniteLossError, TrainResult,
                                 train_and_evaluate)

__all__ = ["CheckpointError", "MetricWriter", "NonFiniteLossError",
           "RunCheckpoints", "TrainResult", "load_checkpoint", "read_metrics",
           "train_and_evaluate"]
