"""Accuracy and loss of a model on a dataset split (inference mode, padded batches)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rtjax.data import Split, eval_batches
from rtjax.models import inference_view


@functools.partial(jax.jit, static_argnums=0)
def _sums(graphdef, state, images, labels, mask):
  logits = nnx.merge(graphdef, state)(images)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  # A token model's labels are (batch, T): every position is one prediction.
  mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (labels.ndim - 1)),
                          labels.shape)
  return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


def evaluate(model: nnx.Module, split: Split, batch_size: int,
             feed: Callable = lambda *arrays: jax.device_put(arrays)
             ) -> dict[str, float]:
  """{'loss', 'accuracy'} over the whole split (per example, or per token
  of a token model: loss in nats, accuracy of the next token); `feed`
  places each batch."""
  graphdef, state = nnx.split(inference_view(model))
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for images, labels, mask in eval_batches(split, batch_size):
    out = _sums(graphdef, state, *feed(images, labels, mask))
    totals = {k: totals[k] + float(v) for k, v in out.items()}
  count = max(totals["count"], 1.0)
  result = {"loss": totals["loss"] / count,
            "accuracy": totals["correct"] / count}
  if split.labels.ndim > 1:  # next-token prediction: bits per token (char)
    result["bits_per_token"] = result["loss"] / math.log(2)
  return result


def predict_logits(model: nnx.Module, images: np.ndarray,
                   batch_size: int = 512) -> np.ndarray:
  """Inference-mode logits for all rows (used by reports and comparisons)."""
  graphdef, state = nnx.split(inference_view(model))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return np.concatenate([np.asarray(forward(state, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])
