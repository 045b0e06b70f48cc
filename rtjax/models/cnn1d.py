"""1D CNN over a (time, channels) sequence: the MNIST-1D paper's CNN and
wider/deeper variants, BatchNorm optional.

The paper's ConvBase (greydanus/mnist1d, notebooks/models.py) is three
Conv1d of 25 channels, kernels 5, 3, 3, stride 2, padding 1, each followed by
ReLU, then one Linear over the flattened features: 40 -> 19 -> 10 -> 5 steps,
5 x 25 = 125 features. These are the defaults. Features flatten here in
(time, channel) order (torch flattens (channel, time)): the same model up to
a permutation of the head's rows.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from rtjax.models.depth import trim
from rtjax.models.groups import Axis, Group, batchnorm_axes, per_block
from rtjax.models.registry import full_args, register

HEADS = ("flatten", "mean")


def _lengths(args: dict) -> list[int]:
  """Sequence length after each conv layer."""
  depth = len(args["channels"])
  kernels = per_block(args["kernel_size"], depth)
  strides = per_block(args["strides"], depth)
  length, lengths = args["input_shape"][0], []
  for k, s in zip(kernels, strides):
    length = (length + 2 * args["padding"] - k) // s + 1
    lengths.append(length)
  return lengths


def _prunable_groups(args: dict) -> list[Group]:
  """One group per conv layer: its filters, bias or BatchNorm, and the next
  layer's input channels; the last layer's channels repeat once per output
  step in the flattened head input (time-major, so tiles)."""
  args = full_args(CNN1D, args)
  channels, bn = list(args["channels"]), args["batchnorm"]
  tiles = _lengths(args)[-1] if args["head"] == "flatten" else 1
  groups = []
  for i, width in enumerate(channels, start=1):
    c = f"conv{i}"
    axes = [Axis(f"{c}/kernel", 2)]
    producers = [Axis(f"{c}/kernel", 2)]
    if bn:
      axes += batchnorm_axes(f"{c}_bn")
      producers.append(Axis(f"{c}_bn/scale", 0))
    else:
      axes.append(Axis(f"{c}/bias", 0))
    axes.append(Axis(f"conv{i + 1}/kernel", 1) if i < len(channels)
                else Axis("head/kernel", 0, tiles=tiles))
    groups.append(Group(c, width, axes, producers))
  return groups


def _with_widths(args: dict, widths: dict) -> dict:
  depth = len(full_args(CNN1D, args)["channels"])
  return {**args, "channels": [widths[f"conv{i}"] for i in range(1, depth + 1)]}


def _shallower(args: dict) -> list[dict]:
  """The last conv layer removed."""
  depth = len(args["channels"]) - 1
  if depth < 1:
    return []
  return [{**args, **{k: trim(args[k], depth) for k in (
      "channels", "kernel_size", "strides")}}]


@register("cnn1d")
class CNN1D(nnx.Module):
  """[conv_i (-> BatchNorm) -> ReLU] -> flatten or time-mean -> head."""

  prunable_groups = staticmethod(_prunable_groups)
  with_widths = staticmethod(_with_widths)
  shallower = staticmethod(_shallower)

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               channels: Sequence[int] = (25, 25, 25),
               kernel_size: int | Sequence[int] = (5, 3, 3),
               strides: int | Sequence[int] = 2,
               padding: int = 1,
               batchnorm: bool = False,
               head: str = "flatten",
               *,
               rngs: nnx.Rngs):
    """`kernel_size`, `strides`: one value or one per layer; `padding`: zeros
    on each side of every conv; `head`: 'flatten' (the paper's linear over
    all steps) or 'mean' (global average pool over time)."""
    depth = len(channels)
    if depth < 1:
      raise ValueError(f"cnn1d: at least one conv layer, got {depth}")
    if head not in HEADS:
      raise ValueError(f"cnn1d: head must be one of {HEADS}, got {head!r}")
    kernels = per_block(kernel_size, depth)
    stride_list = per_block(strides, depth)
    if len(kernels) != depth or len(stride_list) != depth:
      raise ValueError(f"cnn1d: kernel_size and strides need one entry per "
                       f"layer ({depth}), got {kernels} and {stride_list}")
    lengths = _lengths({"channels": channels, "kernel_size": kernels,
                        "strides": stride_list, "padding": padding,
                        "input_shape": input_shape})
    if lengths[-1] < 1:
      raise ValueError(f"cnn1d: a {input_shape[0]}-step input is shorter "
                       f"than the convs need (lengths {lengths})")
    self.depth, self.head_kind = depth, head
    # Folded for serving (rtjax.infer.fold); as many as this instance has.
    self.batchnorm_pairs = (tuple((f"conv{i}", f"conv{i}_bn")
                                  for i in range(1, depth + 1))
                            if batchnorm else ())
    in_ch = input_shape[-1]
    for i, (out_ch, k, s) in enumerate(zip(channels, kernels, stride_list),
                                       start=1):
      setattr(self, f"conv{i}", nnx.Conv(
          in_ch, out_ch, (k,), strides=(s,), padding=((padding, padding),),
          use_bias=not batchnorm, rngs=rngs))  # BatchNorm brings the bias
      setattr(self, f"conv{i}_bn", nnx.BatchNorm(out_ch, momentum=0.9,
                                                 rngs=rngs)
              if batchnorm else None)
      in_ch = out_ch
    features = in_ch * (lengths[-1] if head == "flatten" else 1)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(1, self.depth + 1):
      x = getattr(self, f"conv{i}")(x)
      bn = getattr(self, f"conv{i}_bn")
      x = nnx.relu(x if bn is None else bn(x))
    x = x.reshape(x.shape[0], -1) if self.head_kind == "flatten" else x.mean(1)
    return self.head(x)

