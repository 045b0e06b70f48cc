"""Structured pruning that emits a smaller model of the same family.

Each family declares its prunable *groups* of units beside its class
(rtjax.models.groups): how wide each is, which weights rank its units, and
every parameter axis the group touches. Shrinking keeps the most important
units of every selected group, rewrites the constructor arguments and slices
the parameters, so coupled dimensions stay consistent by construction.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from rtjax.errors import ConfigError
from rtjax.models import abstract_model, model_class
from rtjax.models.groups import Axis

CRITERIA = ("l1", "l2", "bn_scale")


def _norms(state: "_Params", producers: list[Axis], width: int, criterion: str):
  score = np.zeros(width)
  for p in producers:
    value = np.asarray(state[p.path], np.float64)
    if criterion == "bn_scale" and not p.path.endswith("scale"):
      continue
    if criterion != "bn_scale" and p.path.endswith("scale"):
      continue
    moved = np.moveaxis(value, p.axis, 0).reshape(width, p.block, -1)
    score += (moved ** 2 if criterion == "l2" else np.abs(moved)).sum(axis=(1, 2))
  return np.sqrt(score) if criterion == "l2" else score


class _Params:
  """A model's state by path name ('blocks/0/conv1/kernel'), flattened with
  flax.traverse_util and rebuilt as the nested dict nnx expects."""

  def __init__(self, model: nnx.Module):
    self.flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    self.keys = {"/".join(map(str, key)): key for key in self.flat}

  def __getitem__(self, path: str):
    return np.asarray(self.flat[self.keys[path]])

  def __setitem__(self, path: str, value) -> None:
    self.flat[self.keys[path]] = value

  def into(self, model: nnx.Module) -> nnx.Module:
    """`model` holding these parameters as jax arrays (what serving,
    training and bf16 casting expect)."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in self.flat.items()}))
    nnx.update(model, state)
    return model


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


def _family(name: str):
  """The family's class, which declares its prunable groups."""
  cls = model_class(name)
  if not hasattr(cls, "prunable_groups"):
    raise ConfigError(f"model {name!r} declares no prunable groups, so "
                      "structured pruning cannot shrink it")
  return cls


def shrink(model: nnx.Module, name: str, args: dict, keep_fraction: float,
           criterion: str = "l2", round_to: int = 1, groups: str = ".*"
           ) -> tuple[nnx.Module, dict, dict]:
  """(smaller model, its constructor args, {group: (width, kept)})."""
  if criterion not in CRITERIA:
    raise ConfigError(f"unknown importance criterion {criterion!r}; known: "
                     f"{', '.join(CRITERIA)}")
  family = _family(name)
  state = _Params(model)
  selected, widths, summary = [], {}, {}
  for group in family.prunable_groups(args):
    keep = (kept_count(group.width, keep_fraction, round_to, group.unit)
            if re.search(groups, group.name) else group.width)
    if criterion == "bn_scale" and not any(
        p.path.endswith("scale") for p in group.producers):
      raise ConfigError(f"criterion 'bn_scale' needs BatchNorm; group "
                       f"{group.name} of {name} has none: use l1 or l2")
    score = _norms(state, group.producers, group.width, criterion)
    kept = np.sort(np.argsort(-score, kind="stable")[:keep])
    selected.append((group, kept))
    widths[group.name] = keep
    summary[group.name] = {"width": group.width, "kept": keep}
  for group, kept in selected:
    for axis in group.axes:
      state[axis.path] = np.take(state[axis.path],
                                 _indices(kept, group.width, axis),
                                 axis=axis.axis)
  new_args = family.with_widths(args, widths)
  # Every array is replaced, so the new model is built abstract: a random
  # initialization compiles per shape (seconds per model on a CPU).
  return state.into(abstract_model(name, new_args)), new_args, summary


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
  family = _family(name)
  state = _Params(model)
  widths = {}
  for group in family.prunable_groups(args):
    step = multiple // math.gcd(multiple, group.unit)
    new_width = math.ceil(group.width / step) * step
    widths[group.name] = new_width
    if new_width == group.width:
      continue
    for axis in group.axes:
      value = state[axis.path]
      if axis.path.endswith("/var"):  # keep padded BatchNorm channels finite
        padded = _pad(value - 1.0, group.width, new_width, axis) + 1.0
      else:
        padded = _pad(value, group.width, new_width, axis)
      state[axis.path] = padded
  new_args = family.with_widths(args, widths)
  return state.into(abstract_model(name, new_args)), new_args
