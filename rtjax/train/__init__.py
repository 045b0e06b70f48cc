"""Training one model: the step, the loop, metrics, preemption, NaN guard."""

from rtjax.train.metrics import MetricWriter, read_metrics
from rtjax.train.step import CrossEntropy, train_step
from rtjax.train.trainer import (NonFiniteLossError, Stage, TrainResult,
                                 train_and_evaluate, train_model)

__all__ = ["CrossEntropy", "MetricWriter", "NonFiniteLossError", "Stage",
           "TrainResult", "read_metrics", "train_and_evaluate", "train_model",
           "train_step"]
