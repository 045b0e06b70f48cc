"""Size and cost of a model: parameter count and FLOPs from XLA's cost analysis."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.models.modes import inference_view


def param_count(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param leaves), not BatchNorm statistics."""
  params = nnx.state(model, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def cost_analysis(compiled: jax.stages.Compiled) -> dict[str, float]:
  """XLA's cost analysis as one dict (older jax returned a list of dicts)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def forward_flops(model: nnx.Module, input_shape: Sequence[int],
                  batch_size: int = 1) -> float:
  """FLOPs of one inference forward pass, counted by XLA on the compiled HLO."""
  graphdef, state = nnx.split(inference_view(model))

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
  compiled = jax.jit(forward).lower(state, x).compile()
  return float(cost_analysis(compiled).get("flops", 0.0))
