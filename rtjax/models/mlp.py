"""MLP over the flattened input: the MNIST-1D paper's MLP and, with no hidden
layers, its logistic regression.

The paper's MLPBase (greydanus/mnist1d, notebooks/models.py) is
Linear(40, 100)-ReLU, then h + ReLU(Linear(100, 100)(h)), then Linear(100, 10):
two hidden layers of 100 with a residual connection around the second, which
`residual=True` (the default) reproduces. `hidden=()` is its LinearBase.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from rtjax.models.groups import Axis, Group
from rtjax.models.registry import full_args, register


def _streams(args: dict) -> list[list[int]]:
  """Hidden layers (1-based) that share one width: with residual connections
  every hidden layer adds to the one before, so they all share one width."""
  depth = len(args["hidden"])
  if not depth:
    return []
  if args["residual"]:
    return [list(range(1, depth + 1))]
  return [[i] for i in range(1, depth + 1)]


def _group_name(layers: list[int]) -> str:
  return f"fc{layers[0]}" if len(layers) == 1 else "hidden"


def _prunable_groups(args: dict) -> list[Group]:
  args = full_args(MLP, args)
  hidden = list(args["hidden"])
  groups = []
  for layers in _streams(args):
    axes, producers = [], []
    for i in layers:
      axes += [Axis(f"fc{i}/kernel", 1), Axis(f"fc{i}/bias", 0)]
      producers.append(Axis(f"fc{i}/kernel", 1))
      nxt = f"fc{i + 1}" if i < len(hidden) else "head"
      axes.append(Axis(f"{nxt}/kernel", 0))
    groups.append(Group(_group_name(layers), hidden[layers[0] - 1], axes,
                        producers))
  return groups


def _with_widths(args: dict, widths: dict) -> dict:
  full = full_args(MLP, args)
  hidden = list(full["hidden"])
  for layers in _streams(full):
    for i in layers:
      hidden[i - 1] = widths[_group_name(layers)]
  return {**args, "hidden": hidden}


def _shallower(args: dict) -> list[dict]:
  """The last hidden layer removed."""
  hidden = list(args["hidden"])
  return [{**args, "hidden": hidden[:-1]}] if len(hidden) > 1 else []


@register("mlp")
class MLP(nnx.Module):
  """Flatten -> [fc_i -> ReLU] -> head. Widths are arguments so structured
  pruning can rebuild it narrower."""

  prunable_groups = staticmethod(_prunable_groups)
  with_widths = staticmethod(_with_widths)
  shallower = staticmethod(_shallower)

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               hidden: Sequence[int] = (100, 100),
               residual: bool = True,
               *,
               rngs: nnx.Rngs):
    """`residual`: every hidden layer after the first adds its ReLU output to
    its input (the paper's MLP), so all hidden widths must be equal."""
    hidden = [int(h) for h in hidden]
    if residual and len(set(hidden)) > 1:
      raise ValueError(f"mlp: residual connections need equal hidden widths, "
                       f"got {hidden}; set residual=False")
    self.residual = residual
    self.depth = len(hidden)
    width = math.prod(input_shape)
    for i, h in enumerate(hidden, start=1):
      setattr(self, f"fc{i}", nnx.Linear(width, h, rngs=rngs))
      width = h
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape(x.shape[0], -1)
    for i in range(1, self.depth + 1):
      y = nnx.relu(getattr(self, f"fc{i}")(x))
      x = x + y if self.residual and i > 1 else y
    return self.head(x)
