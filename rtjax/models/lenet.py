"""LeNet-5 as used on CIFAR: two 5x5 VALID convs with max-pooling, three dense layers."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from rtjax.models.groups import Axis, Group
from rtjax.models.registry import register


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2, stride-2 VALID max pooling as the max of four strided slices: the
  values of nnx.max_pool, faster than its reduce_window on XLA's CPU backend
  (README, "Targets")."""
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return jnp.maximum(jnp.maximum(x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2]),
                     jnp.maximum(x[:, 1:h:2, 0:w:2], x[:, 1:h:2, 1:w:2]))


@register("lenet5")
class LeNet5(nnx.Module):
  """Widths are arguments so structured pruning can rebuild it narrower."""

  no_shallower = ("LeNet-5 is two convs and three dense layers by definition: "
                  "its constructor takes widths, not a depth")

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int] = (32, 32, 3),
               conv_channels: Sequence[int] = (6, 16),
               hidden: Sequence[int] = (120, 84),
               *,
               rngs: nnx.Rngs):
    height, width, channels = input_shape
    c1, c2 = conv_channels
    self.conv1 = nnx.Conv(channels, c1, (5, 5), padding="VALID", rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (5, 5), padding="VALID", rngs=rngs)
    # Two (VALID 5x5 conv, 2x2 pool) pairs: 32 -> 28 -> 14 -> 10 -> 5.
    out_h = ((height - 4) // 2 - 4) // 2
    out_w = ((width - 4) // 2 - 4) // 2
    if out_h < 1 or out_w < 1:
      raise ValueError(f"lenet5 needs inputs of at least 16x16, got {height}x{width}")
    h1, h2 = hidden
    self.fc1 = nnx.Linear(out_h * out_w * c2, h1, rngs=rngs)
    self.fc2 = nnx.Linear(h1, h2, rngs=rngs)
    self.head = nnx.Linear(h2, num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = max_pool_2x2(nnx.relu(self.conv1(x)))
    x = max_pool_2x2(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.head(x)

  @staticmethod
  def prunable_groups(args: dict) -> list[Group]:
    h, w, _ = args["input_shape"]
    positions = (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
    c1, c2 = args["conv_channels"]
    f1, f2 = args["hidden"]
    return [
        Group("conv1", c1, [Axis("conv1/kernel", 3), Axis("conv1/bias", 0),
                            Axis("conv2/kernel", 2)], [Axis("conv1/kernel", 3)]),
        Group("conv2", c2, [Axis("conv2/kernel", 3), Axis("conv2/bias", 0),
                            Axis("fc1/kernel", 0, tiles=positions)],
              [Axis("conv2/kernel", 3)]),
        Group("fc1", f1, [Axis("fc1/kernel", 1), Axis("fc1/bias", 0),
                          Axis("fc2/kernel", 0)], [Axis("fc1/kernel", 1)]),
        Group("fc2", f2, [Axis("fc2/kernel", 1), Axis("fc2/bias", 0),
                          Axis("head/kernel", 0)], [Axis("fc2/kernel", 1)]),
    ]

  @staticmethod
  def with_widths(args: dict, widths: dict) -> dict:
    return {**args, "conv_channels": [widths["conv1"], widths["conv2"]],
            "hidden": [widths["fc1"], widths["fc2"]]}
