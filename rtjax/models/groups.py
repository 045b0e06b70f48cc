"""How a family describes its prunable groups of units (conv filters, dense
units, attention heads, MLP hidden units), declared beside its class.

A group lists every parameter axis its units touch: the producing layer's
outputs, its BatchNorm, the next layers' inputs, residual partners. Structured
pruning (rtjax.compress.structured) slices all of them together, so coupled
dimensions stay consistent by construction. A family class provides
`prunable_groups(args) -> list[Group]` and `with_widths(args, {group: width})
-> args` as static methods.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass
class Axis:
  """One parameter axis a group slices. `block`: each unit spans `block`
  consecutive entries (a head's head_dim columns); `tiles`: the axis is
  `tiles` repetitions of the group's units (a flattened HxWxC input)."""
  path: str
  axis: int
  block: int = 1
  tiles: int = 1


@dataclasses.dataclass
class Group:
  name: str
  width: int
  axes: list[Axis]
  producers: list[Axis]  # weights/BN scales whose rows rank the units
  unit: int = 1  # entries per unit along the hardware dimension (head_dim)


def batchnorm_axes(prefix: str) -> list[Axis]:
  """The four per-channel arrays of the BatchNorm at `prefix`."""
  return [Axis(f"{prefix}/{p}", 0) for p in ("scale", "bias", "mean", "var")]


def per_block(value, depth: int) -> list:
  """A per-block argument given as one value or one entry per block."""
  return list(value) if isinstance(value, (list, tuple)) else [value] * depth


def path_name(key_path) -> str:
  """A parameter's path as 'blocks/0/conv1/kernel': the one spelling that
  groups, sharding rules, pruning regexes and layer reports share."""
  name = jax.tree_util.keystr(key_path, simple=True, separator="/")
  return name.removesuffix("/value")  # an nnx.Variable's own leaf
