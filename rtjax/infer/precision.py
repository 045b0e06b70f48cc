"""Reduced-precision serving: weights and activations in bf16, every Linear
and Conv product accumulated in f32 (preferred_element_type) and rounded to
bf16 once per layer, so a layer's result carries bf16's 8 bits of mantissa,
not the error of a bf16 running sum.

Other products (a ViT's attention einsums) keep XLA's default accumulation,
which for bf16 operands is f32 on TPU and GPU and on XLA's CPU (it computes
bf16 dots as f32 ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str):
  """'float32' | 'bfloat16' -> the jnp dtype; ValueError names the choices."""
  if name not in DTYPES:
    raise ValueError(f"serving dtype {name!r}: use one of {', '.join(DTYPES)}")
  return DTYPES[name]


def _accumulating_in_f32(op, dtype):
  """A lax.dot_general / conv_general_dilated that sums in f32 and returns
  `dtype` (what the layer passes as preferred_element_type is ignored)."""
  def call(*args, preferred_element_type=None, **kwargs):
    del preferred_element_type
    return op(*args, preferred_element_type=jnp.float32, **kwargs).astype(dtype)
  return call


def is_float_model(model: nnx.Module) -> bool:
  """True when every parameter is a plain float array (not int8/qwix)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return all(isinstance(p, jax.Array) and jnp.issubdtype(p.dtype, jnp.floating)
             for p in leaves)


def with_dtype(model: nnx.Module, dtype) -> nnx.Module:
  """A copy of a float model computing in `dtype` (float32: the model)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return model
  if not is_float_model(model):
    raise ValueError(f"{dtype} serving takes float models; this one holds "
                     "quantized (int8) parameters")
  model = nnx.clone(model)
  for _, module in list(nnx.iter_graph(model)):
    if isinstance(module, nnx.Linear):
      module.dtype = module.param_dtype = dtype
      module.dot_general = _accumulating_in_f32(jax.lax.dot_general, dtype)
    elif isinstance(module, nnx.Conv):
      module.dtype = module.param_dtype = dtype
      module.conv_general_dilated = _accumulating_in_f32(
          jax.lax.conv_general_dilated, dtype)
    elif hasattr(module, "dtype") and hasattr(module, "param_dtype"):
      module.dtype = module.param_dtype = dtype  # norms, embeddings, cells
  state = nnx.state(model)
  nnx.update(model, jax.tree.map(
      lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v,
      state))
  return model
