"""Optimizer and learning-rate schedule from a config's `train` section (optax)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to 0 at num_steps (or constant)."""
  peak, warmup = train_config.learning_rate, train_config.warmup_steps
  if train_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=train_config.num_steps, end_value=0.0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.constant_schedule(peak)], [warmup])


def _is_kernel(params):
  """Weight decay applies to kernels/embeddings, not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_config)
  if train_config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=train_config.weight_decay,
                     mask=_is_kernel)
  else:
    tx = optax.chain(
        optax.add_decayed_weights(train_config.weight_decay, mask=_is_kernel),
        optax.sgd(schedule, momentum=train_config.momentum,
                  nesterov=train_config.nesterov))
  if train_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return tx
