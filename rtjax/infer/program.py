"""A served forward pass as a program to compile, kept apart from placing its
weights on devices.

Lowering and compiling need only a mesh and abstract weights (shapes, dtypes
and shardings as jax.ShapeDtypeStruct), so a program compiles for devices
that are not attached, e.g. a TPU slice described by
jax.experimental.topologies. `Program.place` puts the weights on the mesh once
its devices are there. Embedded weights are constants of the executable:
compiling them needs their values (host copies), still not a device.

A model may itself be abstract (`nnx.eval_shape(lambda: Model(...))`): every
rewrite serving applies to it (BatchNorm folding, widening, a conv lowering,
the serving dtype) runs on its shapes alone (`transformed`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rtjax.errors import FlagError
from rtjax.infer import mesh as mesh_lib
from rtjax.infer import precision
from rtjax.models.registry import input_dtype


def holds_shapes(tree) -> bool:
  """True when `tree` holds shapes (jax.ShapeDtypeStruct), not values."""
  return any(isinstance(leaf, jax.ShapeDtypeStruct)
             for leaf in jax.tree.leaves(tree))


def is_abstract(model: nnx.Module) -> bool:
  return holds_shapes(nnx.state(model))


def transformed(model: nnx.Module, rewrite: Callable[[nnx.Module], nnx.Module],
                what: str) -> nnx.Module:
  """rewrite(model); for an abstract model, the shapes it would give. A
  rewrite that computes from the weights' values (`what`, e.g. a banded
  conv lowering) cannot run on shapes: a FlagError says so."""
  if not is_abstract(model):
    return rewrite(model)
  try:
    return nnx.eval_shape(rewrite, model)
  except jax.errors.JAXTypeError as e:  # a value was asked of a shape
    raise FlagError(f"{what} computes from the weights' values; compile "
                    "from the model's weights, not their shapes") from e


def is_float_model(model: nnx.Module) -> bool:
  """precision.is_float_model, for values or shapes alike."""
  if not is_abstract(model):
    return precision.is_float_model(model)
  return all(jnp.issubdtype(p.dtype, jnp.floating)
             for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class Program:
  """One served forward, `jitted(weights, images)`, with its shardings fixed.

  `weights` are what each call passes (values, or shapes for an abstract
  model; {} when embedded) and `shardings` their places on the mesh."""
  jitted: Any
  weights: Any
  shardings: Any
  input_sharding: NamedSharding
  input_shape: tuple[int, ...]
  input_dtype: np.dtype  # float32 features, or a token model's int32 ids

  def abstract_weights(self):
    """The weights as jax.ShapeDtypeStruct with their shardings: all that
    lowering needs of them."""
    return jax.tree.map(
        lambda w, s: jax.ShapeDtypeStruct(
            np.shape(w), w.dtype, sharding=s,
            weak_type=getattr(w, "weak_type", False)),
        self.weights, self.shardings)

  def input_spec(self, batch: int) -> jax.ShapeDtypeStruct:
    """`batch` rows split over the mesh's data axis."""
    return jax.ShapeDtypeStruct((batch, *self.input_shape), self.input_dtype,
                                sharding=self.input_sharding)

  def lower(self, batch: int) -> jax.stages.Lowered:
    return self.jitted.lower(self.abstract_weights(), self.input_spec(batch))

  def compile(self, batch: int, compiler_options: dict | None = None
              ) -> jax.stages.Compiled:
    """The executable for `batch` rows, from shapes alone: no device holds
    a weight for it (the mesh's devices need not be attached)."""
    return self.lower(batch).compile(compiler_options=compiler_options)

  def place(self):
    """The weights on the mesh, once, for every call of every batch."""
    if holds_shapes(self.weights):
      raise FlagError("these weights are shapes, not values: place the "
                      "model's weights (CompiledModel.place(model))")
    return jax.device_put(self.weights, self.shardings)


def build(model: nnx.Module, input_shape: Sequence[int], mesh: Mesh,
          dtype, rules, embed_weights: bool) -> Program:
  """`model`'s forward computing in `dtype` (host arrays stay float32 at the
  boundary: a cast in, a cast out), weights sharded by the family's tensor-
  parallel `rules`, or compiled in as constants when `embed_weights`."""
  dtype = jnp.dtype(dtype)
  graphdef, state = nnx.split(transformed(
      model, lambda m: precision.with_dtype(m, dtype), f"dtype {dtype}"))
  inputs = np.dtype(input_dtype(model))
  cast = jnp.issubdtype(inputs, jnp.floating)  # token ids stay integers
  run = (lambda m, images: m(images) if dtype == jnp.float32
         else m(images.astype(dtype) if cast else images).astype(jnp.float32))
  if embed_weights:  # host copies become constants: no weight inputs
    if holds_shapes(state):
      raise FlagError("embed_weights compiles the weights' values into the "
                      "program: give the model's weights, not their shapes")
    constants, state = jax.tree.map(np.asarray, state), {}
    forward = lambda _, images: run(nnx.merge(graphdef, constants), images)
  else:
    forward = lambda state, images: run(nnx.merge(graphdef, state), images)
  shardings = mesh_lib.weight_shardings(state, mesh, rules)
  input_sharding = mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(forward, in_shardings=(shardings, input_sharding),
                   out_shardings=input_sharding)
  return Program(jitted, state, shardings, input_sharding,
                 tuple(int(d) for d in input_shape), inputs)
