"""The optimizer and its schedule: the same schedule as optax's, and one
compiled train step for runs that differ only in length or learning rate."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from rtjax import models
from rtjax.data.registry import dataset_spec
from rtjax.train.optim import learning_rate_schedule, make_optimizer
from rtjax.train.step import CrossEntropy, train_step
from rtjax.train.metrics import TrainMetrics


def _reference(train):
  """optax's own schedules, as the constants they were built from."""
  if train.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, train.warmup_steps, train.num_steps, 0.0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, train.learning_rate,
                             max(train.warmup_steps, 1)),
       optax.constant_schedule(train.learning_rate)], [train.warmup_steps])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("warmup,steps", [(0, 50), (5, 50), (1, 2)])
def test_schedule_is_optaxs(tiny_config, schedule, warmup, steps):
  train = tiny_config.train
  train.update(schedule=schedule, warmup_steps=warmup, num_steps=steps)
  ours, theirs = learning_rate_schedule(train), _reference(train)
  np.testing.assert_allclose([float(ours(i)) for i in range(steps + 2)],
                             [float(theirs(i)) for i in range(steps + 2)],
                             rtol=1e-6, atol=1e-9)


def _train_step_program(config) -> str:
  data = dataset_spec(config.data)
  args = {**config.model.args, "num_classes": data.num_classes,
          "input_shape": list(data.input_shape)}
  model = models.create_model(config.model.name, args, 0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(config.train)
  window = TrainMetrics(None)
  shape = (config.train.batch_size, *data.input_shape)
  images = jax.ShapeDtypeStruct(shape, np.float32)
  labels = jax.ShapeDtypeStruct(shape[:1], np.int32)
  return train_step.lower(
      graphdef, tx, CrossEntropy(data.num_classes), window.graphdef, params, rest,
      tx.init(params), window.state, images, labels).as_text()


def test_runs_differing_in_length_and_rate_share_one_program(tiny_config):
  first = _train_step_program(tiny_config)
  tiny_config.train.update(num_steps=3 * tiny_config.train.num_steps,
                           warmup_steps=7, learning_rate=0.123)
  assert _train_step_program(tiny_config) == first
