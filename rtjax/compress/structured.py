"""Structured pruning that emits a smaller model of the same family.

Each family describes its prunable *groups* of units (conv filters, dense
units, attention heads, MLP hidden units): how wide each is, how important
each unit is, and every parameter axis the group touches (the producing
layer's outputs, its BatchNorm, the next layers' inputs, residual partners).
Shrinking keeps the most important units of every selected group, rewrites
the constructor arguments and slices the parameters, so coupled dimensions
stay consistent by construction.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from flax import nnx

from rtjax.models import create_model

CRITERIA = ("l1", "l2", "bn_scale")


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


def _norms(state: dict, producers: list[Axis], width: int, criterion: str):
  score = np.zeros(width)
  for p in producers:
    value = np.asarray(_get(state, p.path), np.float64)
    if criterion == "bn_scale" and not p.path.endswith("scale"):
      continue
    if criterion != "bn_scale" and p.path.endswith("scale"):
      continue
    moved = np.moveaxis(value, p.axis, 0).reshape(width, p.block, -1)
    score += (moved ** 2 if criterion == "l2" else np.abs(moved)).sum(axis=(1, 2))
  return np.sqrt(score) if criterion == "l2" else score


def _get(tree: dict, path: str):
  for key in path.split("/"):
    tree = tree[int(key) if key.isdigit() and int(key) in tree else key]
  return tree


def _set(tree: dict, path: str, value) -> None:
  keys = path.split("/")
  for key in keys[:-1]:
    tree = tree[int(key) if key.isdigit() and int(key) in tree else key]
  tree[keys[-1]] = value


def _indices(kept: np.ndarray, width: int, axis: Axis) -> np.ndarray:
  idx = (kept[:, None] * axis.block + np.arange(axis.block)).ravel()
  per_tile = width * axis.block
  return (np.arange(axis.tiles)[:, None] * per_tile + idx[None, :]).ravel()


def kept_count(width: int, keep_fraction: float, round_to: int,
               unit: int = 1) -> int:
  """ceil(width * fraction) units, rounded up so that units * unit is a
  multiple of round_to (8 on CPU vectors, 128 on TPU lanes), at most width."""
  step = round_to // math.gcd(round_to, unit)
  count = math.ceil(width * keep_fraction / step) * step
  return int(min(width, max(step, count)))


# ---- families --------------------------------------------------------------

def _lenet5_groups(args: dict) -> list[Group]:
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


def _lenet5_args(args: dict, widths: dict) -> dict:
  return {**args, "conv_channels": [widths["conv1"], widths["conv2"]],
          "hidden": [widths["fc1"], widths["fc2"]]}


def _bn_axes(prefix: str) -> list[Axis]:
  return [Axis(f"{prefix}/{p}", 0) for p in ("scale", "bias", "mean", "var")]


def _resnet_layout(args: dict):
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


def _resnet_groups(args: dict) -> list[Group]:
  """Streams: the stem and the blocks joined by identity shortcuts share one
  width (a residual stream); a projection starts a new stream."""
  layout = _resnet_layout(args)
  groups, streams = [], 0
  stream = Group("stream0", args["stem_width"],
                 [Axis("stem/kernel", 3), *_bn_axes("stem_bn")],
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
                     [Axis(f"{b}/proj/kernel", 3), *_bn_axes(f"{b}/proj_bn")],
                     [Axis(f"{b}/proj/kernel", 3), Axis(f"{b}/proj_bn/scale", 0)])
    stream.axes += [Axis(f"{b}/conv2/kernel", 3), *_bn_axes(f"{b}/conv2_bn")]
    stream.producers += [Axis(f"{b}/conv2/kernel", 3),
                         Axis(f"{b}/conv2_bn/scale", 0)]
    groups.append(Group(
        f"{b}/inner", inner_widths[i],
        [Axis(f"{b}/conv1/kernel", 3), *_bn_axes(f"{b}/conv1_bn"),
         Axis(f"{b}/conv2/kernel", 2)],
        [Axis(f"{b}/conv1/kernel", 3), Axis(f"{b}/conv1_bn/scale", 0)]))
  stream.axes.append(Axis("head/kernel", 0))
  groups.append(stream)
  return groups


def _resnet_args(args: dict, widths: dict) -> dict:
  layout = _resnet_layout(args)
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


def _per_block(value, depth):
  return list(value) if isinstance(value, (list, tuple)) else [value] * depth


def _vit_groups(args: dict) -> list[Group]:
  depth, hd = args["depth"], args["head_dim"]
  heads = _per_block(args["num_heads"], depth)
  mlps = _per_block(args["mlp_dim"], depth)
  groups = []
  for i in range(depth):
    a = f"blocks/{i}/attention"
    qkv = [Axis(f"{a}/{n}/kernel", 1, block=hd) for n in ("query", "key", "value")]
    groups.append(Group(
        f"blocks/{i}/heads", heads[i],
        [*qkv, *[Axis(f"{a}/{n}/bias", 0, block=hd)
                 for n in ("query", "key", "value")],
         Axis(f"{a}/out/kernel", 0, block=hd)],
        [*qkv, Axis(f"{a}/out/kernel", 0, block=hd)], unit=hd))
    b = f"blocks/{i}"
    groups.append(Group(
        f"{b}/mlp", mlps[i],
        [Axis(f"{b}/mlp_in/kernel", 1), Axis(f"{b}/mlp_in/bias", 0),
         Axis(f"{b}/mlp_out/kernel", 0)],
        [Axis(f"{b}/mlp_in/kernel", 1), Axis(f"{b}/mlp_out/kernel", 0)]))
  return groups


def _vit_args(args: dict, widths: dict) -> dict:
  depth = args["depth"]
  return {**args,
          "num_heads": [widths[f"blocks/{i}/heads"] for i in range(depth)],
          "mlp_dim": [widths[f"blocks/{i}/mlp"] for i in range(depth)]}


FAMILIES = {"lenet5": (_lenet5_groups, _lenet5_args),
            "resnet": (_resnet_groups, _resnet_args),
            "vit": (_vit_groups, _vit_args)}


def shrink(model: nnx.Module, name: str, args: dict, keep_fraction: float,
           criterion: str = "l2", round_to: int = 1, groups: str = ".*"
           ) -> tuple[nnx.Module, dict, dict]:
  """(smaller model, its constructor args, {group: (width, kept)})."""
  if name not in FAMILIES:
    raise ValueError(f"structured pruning knows {', '.join(FAMILIES)}, not {name!r}")
  if criterion not in CRITERIA:
    raise ValueError(f"unknown importance criterion {criterion!r}; known: "
                     f"{', '.join(CRITERIA)}")
  make_groups, make_args = FAMILIES[name]
  state = nnx.to_pure_dict(nnx.state(model))
  selected, widths, summary = [], {}, {}
  for group in make_groups(args):
    keep = (kept_count(group.width, keep_fraction, round_to, group.unit)
            if re.search(groups, group.name) else group.width)
    if criterion == "bn_scale" and not any(
        p.path.endswith("scale") for p in group.producers):
      raise ValueError(f"criterion 'bn_scale' needs BatchNorm; group "
                       f"{group.name} of {name} has none: use l1 or l2")
    score = _norms(state, group.producers, group.width, criterion)
    kept = np.sort(np.argsort(-score, kind="stable")[:keep])
    selected.append((group, kept))
    widths[group.name] = keep
    summary[group.name] = {"width": group.width, "kept": keep}
  for group, kept in selected:
    for axis in group.axes:
      value = np.asarray(_get(state, axis.path))
      _set(state, axis.path, np.take(value, _indices(kept, group.width, axis),
                                     axis=axis.axis))
  new_args = make_args(args, widths)
  smaller = create_model(name, new_args)
  new_state = nnx.state(smaller)
  nnx.replace_by_pure_dict(new_state, state)
  nnx.update(smaller, new_state)
  return smaller, new_args, summary


def _pad(value: np.ndarray, width: int, new_width: int, axis: Axis) -> np.ndarray:
  """Zero units appended to every tile of `axis` (the inverse of slicing)."""
  moved = np.moveaxis(value, axis.axis, 0)
  tiles = moved.reshape(axis.tiles, width * axis.block, *moved.shape[1:])
  pad = np.zeros((axis.tiles, (new_width - width) * axis.block,
                  *moved.shape[1:]), value.dtype)
  widened = np.concatenate([tiles, pad], axis=1).reshape(-1, *moved.shape[1:])
  return np.moveaxis(widened, 0, axis.axis)


def widen(model: nnx.Module, name: str, args: dict, multiple: int
          ) -> tuple[nnx.Module, dict]:
  """The same function with every unit group padded to a multiple of
  `multiple` by zero units (hardware-friendly widths, e.g. 6 -> 8 filters).

  Zero filters give zero activations (BatchNorm of a padded channel has scale
  0), and the next layer's weights for them are zero, so outputs are unchanged.
  """
  if name not in FAMILIES:
    raise ValueError(f"widening knows {', '.join(FAMILIES)}, not {name!r}")
  make_groups, make_args = FAMILIES[name]
  state = nnx.to_pure_dict(nnx.state(model))
  widths = {}
  for group in make_groups(args):
    step = multiple // math.gcd(multiple, group.unit)
    new_width = math.ceil(group.width / step) * step
    widths[group.name] = new_width
    if new_width == group.width:
      continue
    for axis in group.axes:
      value = np.asarray(_get(state, axis.path))
      if axis.path.endswith("/var"):  # keep padded BatchNorm channels finite
        padded = _pad(value - 1.0, group.width, new_width, axis) + 1.0
      else:
        padded = _pad(value, group.width, new_width, axis)
      _set(state, axis.path, padded)
  new_args = make_args(args, widths)
  wider = create_model(name, new_args)
  new_state = nnx.state(wider)
  nnx.replace_by_pure_dict(new_state, state)
  nnx.update(wider, new_state)
  return wider, new_args
