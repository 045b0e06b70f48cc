"""BatchNorm folding: a serving model computes conv(x) * s + t as one conv.

Each model declares its (layer, BatchNorm) pairs as `batchnorm_pairs` (a
class attribute, or an instance one when the layers depend on arguments);
every such BatchNorm is folded into its Conv or Linear
layer's kernel and bias and replaced by an identity, so serving graphs carry
no normalization ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rtjax.models import inference_view


class Identity(nnx.Module):
  """Stands where a folded BatchNorm was."""

  def __call__(self, x):
    return x


def _fold_into(layer: nnx.Conv | nnx.Linear, bn: nnx.BatchNorm) -> None:
  scale = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
  bias = bn.bias[...] - bn.mean[...] * scale
  if layer.bias is not None:
    bias = bias + layer.bias[...] * scale
  layer.kernel = nnx.Param(layer.kernel[...] * scale)  # scales output channels
  layer.bias = nnx.Param(bias)
  layer.use_bias = True


def fold_batchnorm(model: nnx.Module) -> nnx.Module:
  """Returns an inference copy of `model` with its BatchNorms folded away."""
  model = nnx.clone(inference_view(model))
  for _, module in list(nnx.iter_graph(model)):
    if not isinstance(module, nnx.Module):
      continue
    for layer_name, bn_name in getattr(module, "batchnorm_pairs", ()):
      layer = getattr(module, layer_name, None)
      bn = getattr(module, bn_name, None)
      if (isinstance(bn, nnx.BatchNorm) and isinstance(layer, (nnx.Conv,
                                                                nnx.Linear))
          and isinstance(layer.kernel[...], jax.Array)):  # not int8 (qwix)
        _fold_into(layer, bn)
        setattr(module, bn_name, Identity())
  return model
