"""Streaming inference: a sequence model served as its signal arrives.

`StreamingModel` compiles one executable for a chunk of k time steps and
keeps the model's state between calls (a recurrent model's carry per layer,
a causal Transformer's key/value caches), so a caller feeds a signal step by
step (or k steps at a time) and gets a prediction after every step; after
the last step it equals the whole-sequence forward pass. It needs a family
with `initial_carry`, `step`, `readout` and `stream_refusal` (gru and lstm
unidirectional with head='last'; transformer1d causal, a token per step):
a model that looks ahead needs the whole sequence first.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rtjax.checkpoint import load_checkpoint
from rtjax.errors import FlagError, InputError
from rtjax.models import inference_view


def streamable(model: nnx.Module) -> str | None:
  """Why `model` cannot be streamed, or None when it can."""
  if not hasattr(model, "stream_refusal"):
    return (f"{type(model).__name__} has no state to carry from step to "
            "step; streaming serves gru, lstm and causal transformer1d")
  return model.stream_refusal()


class StreamingModel:

  def __init__(self, model: nnx.Module, input_shape: Sequence[int],
               batch: int = 1, chunk: int = 1):
    """`input_shape`: the whole sequence's (steps, features); each call
    takes (batch, chunk, features) and returns (batch, chunk, classes)."""
    reason = streamable(model)
    if reason:
      raise FlagError(f"cannot stream this model: {reason}")
    if batch < 1 or chunk < 1:
      raise FlagError(f"batch and chunk must be >= 1, got {batch}, {chunk}")
    view = inference_view(model)
    graphdef, self.state = nnx.split(view)
    self.steps, self.features = (int(d) for d in input_shape)
    self.batch, self.chunk = batch, chunk

    def run(state, carry, xs):
      m = nnx.merge(graphdef, state)
      logits = []
      for t in range(chunk):
        carry, out = m.step(carry, xs[:, t])
        logits.append(m.readout([out]))
      return carry, jnp.stack(logits, axis=1)

    self._initial = jax.device_put(view.initial_carry(batch))
    spec = jax.ShapeDtypeStruct((batch, chunk, self.features), jnp.float32)
    start = time.perf_counter()
    self.executable = jax.jit(run).lower(self.state, self._initial,
                                         spec).compile()
    self.compile_seconds = time.perf_counter() - start
    self.metadata: dict | None = None
    self.reset()

  @classmethod
  def from_checkpoint(cls, path: epath.PathLike, **kwargs) -> "StreamingModel":
    model, metadata = load_checkpoint(path)
    stream = cls(model, metadata["model"]["args"]["input_shape"], **kwargs)
    stream.metadata = metadata
    return stream

  def reset(self) -> None:
    """Start a new signal: the state the full forward starts from."""
    self.carry = self._initial

  def run_device(self, xs: jax.Array) -> jax.Array:
    """The device path: one compiled call on a device array, state kept."""
    self.carry, logits = self.executable(self.state, self.carry, xs)
    return logits

  def __call__(self, xs: np.ndarray) -> np.ndarray:
    """The next `chunk` steps of every signal -> logits after each step."""
    xs = np.asarray(xs, np.float32)
    if xs.shape != (self.batch, self.chunk, self.features):
      raise InputError(f"a chunk of shape {xs.shape} given to a stream "
                       f"compiled for {(self.batch, self.chunk, self.features)}"
                       " (batch, steps, features)")
    return np.asarray(self.run_device(xs))
