"""Device meshes and the shardings of serving weights.

Axes: `data` splits the batch (data parallel); `model` splits weights (tensor
parallel). Weight shardings come from rules on the parameter's path that each
model family declares beside its class (rtjax.models.registry: by default
kernels split by output channels; the ViT splits attention heads and MLP
units). A weight whose split dimension does not divide over `model` stays
replicated.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rtjax.errors import FlagError
from rtjax.models.groups import path_name
from rtjax.models.registry import DEFAULT_TENSOR_PARALLEL_RULES

DATA, MODEL = "data", "model"

def parse_mesh(text: str) -> dict[str, int]:
  """'data:4,model:2' -> {'data': 4, 'model': 2}."""
  shape = {}
  for part in filter(None, text.split(",")):
    name, _, size = part.partition(":")
    if name not in (DATA, MODEL) or not size.isdigit() or int(size) < 1:
      raise FlagError(f"bad mesh axis {part!r} in {text!r}: write axes as "
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
    raise FlagError(
        f"mesh {sizes} needs {needed} devices but {len(devices)} are "
        f"available; choose axis sizes whose product is {len(devices)}")
  # Auto axes: XLA's sharding propagation places the activations (and the
  # collectives tensor parallelism needs) from the weights' shardings.
  return jax.make_mesh((sizes[DATA], sizes[MODEL]), (DATA, MODEL),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def _spec_for(path: str, shape: tuple[int, ...], model_size: int,
              rules) -> P:
  for pattern, split_dim in rules:
    if re.search(pattern, path):
      if split_dim is None or model_size == 1:
        return P()
      if len(shape) < -split_dim or shape[split_dim] % model_size:
        return P()
      spec = [None] * len(shape)
      spec[split_dim] = MODEL
      return P(*spec)
  return P()


def weight_shardings(state, mesh: Mesh,
                     rules=DEFAULT_TENSOR_PARALLEL_RULES):
  """NamedSharding for each weight of a serving state, by a family's rules."""
  model_size = mesh.shape[MODEL]

  def sharding(path, leaf):
    name = path_name(path)
    return NamedSharding(mesh, _spec_for(name, leaf.shape, model_size, rules))

  return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))
