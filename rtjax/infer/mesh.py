"""Device meshes and the shardings of serving weights.

Axes: `data` splits the batch (data parallel); `model` splits weights (tensor
parallel). Weight shardings come from logical rules on the parameter's path:
attention q/k/v and the MLP's first layer are split by output units (so heads
and hidden units land on different devices), the attention output and the
MLP's second layer by input units; other kernels by output channels. A weight
whose split dimension does not divide over `model` stays replicated.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# (path regex, index of the dimension split over `model`, counted from the end).
# int8 kernels (qwix) are kernel/array/{qvalue,scale}: split like the kernel.
_KERNEL = r"kernel(/array/(qvalue|scale))?$"
TENSOR_PARALLEL_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(^|/)(query|key|value|mlp_in)/" + _KERNEL, -1),
    (r"(^|/)(query|key|value|mlp_in)/bias$", -1),
    (r"(^|/)(out|mlp_out)/" + _KERNEL, -2),
    (r"(^|/)(out|mlp_out)/bias$", None),
    (r"(^|/)norm[^/]*/(scale|bias)$", None),
    (r"(^|/)" + _KERNEL, -1),
    (r"(^|/)bias$", -1),
)


def parse_mesh(text: str) -> dict[str, int]:
  """'data:4,model:2' -> {'data': 4, 'model': 2}."""
  shape = {}
  for part in filter(None, text.split(",")):
    name, _, size = part.partition(":")
    if name not in (DATA, MODEL) or not size.isdigit() or int(size) < 1:
      raise ValueError(f"bad mesh axis {part!r} in {text!r}: write axes as "
                       f"{DATA}:N,{MODEL}:M with N, M >= 1")
    shape[name] = int(size)
  return shape


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all); default shape puts
  every device on `data`."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = dict(shape or {DATA: len(devices)})
  sizes = {DATA: shape.get(DATA, 1), MODEL: shape.get(MODEL, 1)}
  needed = math.prod(sizes.values())
  if needed != len(devices):
    raise ValueError(
        f"mesh {sizes} needs {needed} devices but {len(devices)} are "
        f"available; choose axis sizes whose product is {len(devices)}")
  # Auto axes: XLA's sharding propagation places the activations (and the
  # collectives tensor parallelism needs) from the weights' shardings.
  return jax.make_mesh((sizes[DATA], sizes[MODEL]), (DATA, MODEL),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def _spec_for(path: str, shape: tuple[int, ...], model_size: int) -> P:
  for pattern, split_dim in TENSOR_PARALLEL_RULES:
    if re.search(pattern, path):
      if split_dim is None or model_size == 1:
        return P()
      if len(shape) < -split_dim or shape[split_dim] % model_size:
        return P()
      spec = [None] * len(shape)
      spec[split_dim] = MODEL
      return P(*spec)
  return P()


def weight_shardings(state, mesh: Mesh):
  """NamedSharding for each weight of a serving state, by the rules above."""
  model_size = mesh.shape[MODEL]

  def sharding(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    name = name.removesuffix("/value")  # an nnx.Variable's own leaf
    return NamedSharding(mesh, _spec_for(name, leaf.shape, model_size))

  return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))
