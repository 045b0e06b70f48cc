"""Unstructured magnitude pruning and N:M sparsity as an optax wrapper.

`pruned(tx, ...)` wraps any optax optimizer. Its state carries the masks, so
they are checkpointed and a resumed run continues with the same masks. At each
mask update the weights are ranked by magnitude after the step and the
smallest are set to exactly zero; between updates the update of a pruned
weight is -weight, so pruned weights stay exactly zero.

Sparsity follows the gradual schedule of Zhu & Gupta (2017):
  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,  t0 <= t <= t0 + n*dt.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rtjax.models.groups import path_name


def polynomial_sparsity(step, initial: float, final: float, begin_step: int,
                        end_step: int):
  """Zhu & Gupta's cubic schedule; constant before begin and after end."""
  span = max(end_step - begin_step, 1)
  progress = jnp.clip((step - begin_step) / span, 0.0, 1.0)
  return final + (initial - final) * (1.0 - progress) ** 3


def prunable_tree(params, include: str = r"kernel$", exclude: str = "") -> object:
  """True for weights that are pruned: kernels (ndim >= 2) matching `include`
  and not `exclude` (regexes on the path, e.g. exclude='head')."""
  def prunable(path, leaf):
    name = path_name(path)
    return bool(leaf.ndim >= 2 and re.search(include, name)
                and not (exclude and re.search(exclude, name)))
  return jax.tree_util.tree_map_with_path(prunable, params)


def magnitude_masks(params, prunable, sparsity, scope: str = "global"):
  """Keeps the largest |w|: one threshold over all prunable weights (global)
  or one per layer (layer)."""
  leaves = [(p, w) for p, w in zip(jax.tree.leaves(prunable),
                                   jax.tree.leaves(params)) if p]

  def threshold(values):
    values = jnp.sort(values)
    index = jnp.clip(jnp.floor(sparsity * values.size).astype(jnp.int32) - 1,
                     -1, values.size - 1)
    return jnp.where(index < 0, -jnp.inf, values[jnp.maximum(index, 0)])

  if scope == "global":
    shared = threshold(jnp.concatenate([jnp.abs(w).ravel() for _, w in leaves]))
  return jax.tree.map(
      lambda p, w: (jnp.abs(w) > (shared if scope == "global" else
                                  threshold(jnp.abs(w).ravel())))
      if p else jnp.ones(w.shape, bool), prunable, params)


def n_m_masks(params, prunable, n: int, m: int):
  """N:M sparsity: in every group of m consecutive weights along the input
  (reduction) dimension, keep the n largest |w|."""
  def mask(p, w):
    if not p:
      return jnp.ones(w.shape, bool)
    out = w.shape[-1]
    reduce = w.size // out
    if reduce % m:
      raise ValueError(f"{n}:{m} sparsity needs the input size ({reduce}) of a "
                       f"{w.shape} kernel to be a multiple of {m}; exclude it")
    groups = jnp.abs(w).reshape(reduce // m, m, out)
    rank = jnp.argsort(jnp.argsort(-groups, axis=1), axis=1)
    return (rank < n).reshape(w.shape)
  return jax.tree.map(mask, prunable, params)


class PruningState(NamedTuple):
  inner: optax.OptState
  masks: object
  count: jax.Array


def pruned(tx: optax.GradientTransformation, prunable_fn: Callable,
           mask_fn: Callable, update_every: int, begin_step: int,
           end_step: int) -> optax.GradientTransformation:
  """Wraps `tx`; `mask_fn(params, prunable, step)` makes masks, applied at
  begin_step, then every `update_every` steps up to end_step."""

  def init(params):
    masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
    return PruningState(tx.init(params), masks, jnp.zeros((), jnp.int32))

  def update(grads, state, params):
    updates, inner = tx.update(grads, state.inner, params)
    step = state.count + 1
    due = ((step >= begin_step) & (step <= end_step)
           & ((step - begin_step) % update_every == 0))
    due = due | (step == end_step)
    prunable = prunable_fn(params)
    candidate = optax.apply_updates(params, updates)
    masks = jax.lax.cond(due, lambda: mask_fn(candidate, prunable, step),
                         lambda: state.masks)
    updates = jax.tree.map(lambda u, w, keep: jnp.where(keep, u, -w),
                           updates, params, masks)
    return updates, PruningState(inner, masks, step)

  return optax.GradientTransformation(init, update)


def sparsity_report(params, prunable) -> dict:
  """Fraction of exact zeros per prunable layer and over all of them."""
  layers, zeros, total = {}, 0, 0
  for (path, w), p in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(prunable)):
    if p:
      count = int(jnp.sum(w == 0))
      layers[path_name(path)] = count / w.size
      zeros, total = zeros + count, total + w.size
  return {"global": zeros / max(total, 1), "layers": layers}
