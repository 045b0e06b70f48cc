"""ResNet-style CNN: BatchNorm, residual basic blocks, explicit per-stage widths.

Every width is a constructor argument (stem, each stage's output, each block's
inner conv) so structured pruning can emit a narrower model of the same family.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from rtjax.models.groups import Axis, Group, batchnorm_axes
from rtjax.models.registry import register


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int,
             rngs: nnx.Rngs) -> tuple[nnx.Conv, nnx.BatchNorm]:
  conv = nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride,
                  padding="SAME", use_bias=False,
                  kernel_init=nnx.initializers.he_normal(), rngs=rngs)
  return conv, nnx.BatchNorm(out_ch, momentum=0.9, rngs=rngs)


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv-BN when shapes change)."""

  batchnorm_pairs = (("conv1", "conv1_bn"), ("conv2", "conv2_bn"),
                     ("proj", "proj_bn"))  # folded away for serving

  def __init__(self, in_ch: int, inner_ch: int, out_ch: int, stride: int,
               projection: bool, *, rngs: nnx.Rngs):
    self.conv1, self.conv1_bn = _conv_bn(in_ch, inner_ch, 3, stride, rngs)
    self.conv2, self.conv2_bn = _conv_bn(inner_ch, out_ch, 3, 1, rngs)
    if projection:
      self.proj, self.proj_bn = _conv_bn(in_ch, out_ch, 1, stride, rngs)
    else:
      self.proj, self.proj_bn = None, None

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nnx.relu(self.conv1_bn(self.conv1(x)))
    y = self.conv2_bn(self.conv2(y))
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(y + shortcut)


# ---- structured pruning: what a narrower ResNet keeps consistent ----------

def _layout(args: dict):
  """Per block: (stage, stride, projection); and the stream of each block."""
  blocks, in_ch, index = [], args["stem_width"], 0
  projections = args.get("projections")
  for stage, (width, count, stride) in enumerate(zip(
      args["stage_widths"], args["blocks_per_stage"], args["stage_strides"])):
    for i in range(count):
      s = stride if i == 0 else 1
      proj = (projections[index] if projections is not None
              else s != 1 or in_ch != width)
      blocks.append((stage, proj))
      in_ch, index = width, index + 1
  return blocks


def _prunable_groups(args: dict) -> list[Group]:
  """Streams: the stem and the blocks joined by identity shortcuts share one
  width (a residual stream); a projection starts a new stream."""
  layout = _layout(args)
  groups, streams = [], 0
  stream = Group("stream0", args["stem_width"],
                 [Axis("stem/kernel", 3), *batchnorm_axes("stem_bn")],
                 [Axis("stem/kernel", 3), Axis("stem_bn/scale", 0)])
  inner_widths = args.get("inner_widths") or [
      args["stage_widths"][stage] for stage, _ in layout]
  for i, (stage, proj) in enumerate(layout):
    b = f"blocks/{i}"
    stream.axes.append(Axis(f"{b}/conv1/kernel", 2))  # block input
    if proj:
      stream.axes.append(Axis(f"{b}/proj/kernel", 2))
      groups.append(stream)
      streams += 1
      stream = Group(f"stream{streams}", args["stage_widths"][stage],
                     [Axis(f"{b}/proj/kernel", 3), *batchnorm_axes(f"{b}/proj_bn")],
                     [Axis(f"{b}/proj/kernel", 3), Axis(f"{b}/proj_bn/scale", 0)])
    stream.axes += [Axis(f"{b}/conv2/kernel", 3), *batchnorm_axes(f"{b}/conv2_bn")]
    stream.producers += [Axis(f"{b}/conv2/kernel", 3),
                         Axis(f"{b}/conv2_bn/scale", 0)]
    groups.append(Group(
        f"{b}/inner", inner_widths[i],
        [Axis(f"{b}/conv1/kernel", 3), *batchnorm_axes(f"{b}/conv1_bn"),
         Axis(f"{b}/conv2/kernel", 2)],
        [Axis(f"{b}/conv1/kernel", 3), Axis(f"{b}/conv1_bn/scale", 0)]))
  stream.axes.append(Axis("head/kernel", 0))
  groups.append(stream)
  return groups


def _with_widths(args: dict, widths: dict) -> dict:
  layout = _layout(args)
  # Stream k is the stem's for k=0; each projection opens the next one.
  stream_of_block, k = [], 0
  for _, proj in layout:
    k += proj
    stream_of_block.append(k)
  stage_widths = list(args["stage_widths"])
  for (stage, _), k in zip(layout, stream_of_block):
    stage_widths[stage] = widths[f"stream{k}"]
  return {**args, "stem_width": widths["stream0"], "stage_widths": stage_widths,
          "inner_widths": [widths[f"blocks/{i}/inner"] for i in range(len(layout))],
          "projections": [bool(p) for _, p in layout]}


def _shallower(args: dict) -> list[dict]:
  """One block fewer in every stage that has more than one; one stage fewer.
  The per-block widths and projections follow from the new layout."""
  out = []
  blocks = list(args["blocks_per_stage"])
  base = {k: v for k, v in args.items()
          if k not in ("inner_widths", "projections")}
  if any(b > 1 for b in blocks):
    out.append({**base, "blocks_per_stage": [max(1, b - 1) for b in blocks]})
  if len(blocks) > 1:
    out.append({**base, **{k: list(args[k])[:-1] for k in (
        "stage_widths", "blocks_per_stage", "stage_strides")}})
  return out


def _droppable_blocks(args: dict) -> list[int]:
  """Blocks after the first of their stage: stride 1, identity shortcut, so
  the stream keeps its shape without them (a stage keeps its first block,
  which changes the width or the stride)."""
  layout = _layout(args)
  return [i for i, (stage, proj) in enumerate(layout)
          if i and layout[i - 1][0] == stage and not proj]


def _without_blocks(args: dict, drop) -> dict:
  layout, drop = _layout(args), set(drop)
  inner = args.get("inner_widths") or [
      args["stage_widths"][stage] for stage, _ in layout]
  counts = list(args["blocks_per_stage"])
  for i in drop:
    counts[layout[i][0]] -= 1
  keep = [i for i in range(len(layout)) if i not in drop]
  return {**args, "blocks_per_stage": counts,
          "inner_widths": [inner[i] for i in keep],
          "projections": [bool(layout[i][1]) for i in keep]}


@register("resnet")
class ResNet(nnx.Module):
  """Stem conv, stages of basic blocks, global average pool, dense head."""

  batchnorm_pairs = (("stem", "stem_bn"),)  # folded away for serving
  prunable_groups = staticmethod(_prunable_groups)
  with_widths = staticmethod(_with_widths)
  shallower = staticmethod(_shallower)
  block_stacks = ("blocks",)
  droppable_blocks = staticmethod(_droppable_blocks)
  without_blocks = staticmethod(_without_blocks)

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               stem_width: int = 32,
               stage_widths: Sequence[int] = (32, 64),
               blocks_per_stage: Sequence[int] = (1, 1),
               stage_strides: Sequence[int] = (1, 2),
               inner_widths: Sequence[int] | None = None,
               projections: Sequence[bool] | None = None,
               *,
               rngs: nnx.Rngs):
    """`inner_widths` gives each block's first conv width, in block order
    (defaults to its stage's width); pruning shrinks them independently.
    `projections` says which blocks have a 1x1 conv shortcut (default: where
    the stride or the width changes); pruning keeps the original choice."""
    if not len(stage_widths) == len(blocks_per_stage) == len(stage_strides):
      raise ValueError(
          "resnet: stage_widths, blocks_per_stage and stage_strides must have "
          f"one entry per stage, got {len(stage_widths)}, "
          f"{len(blocks_per_stage)}, {len(stage_strides)}")
    num_blocks = sum(blocks_per_stage)
    if inner_widths is None:
      inner_widths = [w for w, n in zip(stage_widths, blocks_per_stage)
                      for _ in range(n)]
    if len(inner_widths) != num_blocks:
      raise ValueError(f"resnet: inner_widths needs {num_blocks} entries "
                       f"(one per block), got {len(inner_widths)}")
    if projections is not None and len(projections) != num_blocks:
      raise ValueError(f"resnet: projections needs {num_blocks} entries "
                       f"(one per block), got {len(projections)}")
    self.stem, self.stem_bn = _conv_bn(input_shape[-1], stem_width, 3, 1, rngs)
    blocks = []
    in_ch, block_index = stem_width, 0
    for width, count, stage_stride in zip(stage_widths, blocks_per_stage,
                                          stage_strides):
      for i in range(count):
        stride = stage_stride if i == 0 else 1
        projection = (projections[block_index] if projections is not None
                      else stride != 1 or in_ch != width)
        if not projection and (stride != 1 or in_ch != width):
          raise ValueError(f"resnet: block {block_index} changes shape "
                           f"({in_ch}->{width}, stride {stride}) and needs a "
                           "projection")
        blocks.append(BasicBlock(in_ch, inner_widths[block_index], width,
                                 stride, projection, rngs=rngs))
        in_ch, block_index = width, block_index + 1
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_ch, num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))
