"""Optimizer and learning-rate schedule from a config's `train` section (optax).

The schedule's numbers (peak, warmup, total steps) are injected into the
optimizer state as arrays (optax.inject_hyperparams) rather than baked into
the compiled step as constants: runs of the same model that differ only in
their length or learning rate (an optimizer's rungs, a resumed fine-tune)
compile to the same program, which XLA's compilation cache then loads
instead of compiling again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate(count, peak, warmup, total, cosine: bool):
  """Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at
  `total` (or constant); works on traced values."""
  count = jnp.asarray(count, jnp.float32)
  ramp = peak * count / jnp.maximum(warmup, 1)
  if cosine:
    span = jnp.maximum(total - warmup, 1)
    after = peak * 0.5 * (1 + jnp.cos(
        jnp.pi * jnp.clip(count - warmup, 0, span) / span))
  else:
    after = jnp.asarray(peak, jnp.float32)
  return jnp.where(count < warmup, ramp, after)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """The schedule of `train_config` as a function of the step count."""
  return lambda count: learning_rate(
      count, train_config.learning_rate, train_config.warmup_steps,
      train_config.num_steps, train_config.schedule == "cosine")


def _is_kernel(params):
  """Weight decay applies to kernels/embeddings, not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  cosine = train_config.schedule == "cosine"

  def build(peak, warmup, total) -> optax.GradientTransformation:
    schedule = lambda count: learning_rate(count, peak, warmup, total, cosine)
    if train_config.optimizer == "adamw":
      tx = optax.adamw(schedule, weight_decay=train_config.weight_decay,
                       mask=_is_kernel)
    else:
      tx = optax.chain(
          optax.add_decayed_weights(train_config.weight_decay,
                                    mask=_is_kernel),
          optax.sgd(schedule, momentum=train_config.momentum,
                    nesterov=train_config.nesterov))
    if train_config.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm),
                       tx)
    return tx

  return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(
      peak=train_config.learning_rate, warmup=train_config.warmup_steps,
      total=train_config.num_steps)
