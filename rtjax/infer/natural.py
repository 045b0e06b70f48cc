"""A model's computation as another runtime would naturally get it: rtjax's
XLA-specific rewrites undone, so a peer runs the op it has a kernel for.

The one rewrite undone today: a k x k, stride-k max pool written as the max
of k*k strided slices (LeNet-5's max_pool_2x2, faster than reduce_window on
XLA's CPU) becomes flax's max_pool again, which jax2onnx exports as one
ONNX MaxPool. The model is traced to a jaxpr, the pattern found there, and
the jaxpr evaluated with the pools substituted; nothing names a layer.
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax
from flax import nnx
from jax.extend.core import Var


# jax's max, and jnp.maximum as jax2onnx's patched tracing names it.
MAX = ("max", "jax.numpy.maximum")


def _strided_slice(eqn, k: int | None = None):
  """(input var, (row start, col start), k) of a rank-4 slice with strides
  (1, k, k, 1), or None."""
  if eqn.primitive.name != "slice" or len(eqn.params["start_indices"]) != 4:
    return None
  strides = eqn.params["strides"] or (1, 1, 1, 1)
  start = eqn.params["start_indices"]
  if (strides[0] != 1 or strides[3] != 1 or strides[1] != strides[2]
      or strides[1] < 2 or start[0] or start[3]):
    return None
  return eqn.invars[0], (start[1], start[2]), strides[1]


def find_pools(jaxpr) -> dict:
  """{output var of a max tree: (input var, k)} for every max over the k*k
  strided slices (offsets (i, j), 0 <= i, j < k) of one NHWC input."""
  producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  pools = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name not in MAX:
      continue
    leaves, stack = [], list(eqn.invars)
    while stack:
      var = stack.pop()
      source = producer.get(var) if isinstance(var, Var) else None
      if source is not None and source.primitive.name in MAX:
        stack.extend(source.invars)
      else:
        leaves.append(_strided_slice(source) if source is not None else None)
    if None in leaves:
      continue
    inputs, ks = {leaf[0] for leaf in leaves}, {leaf[2] for leaf in leaves}
    if len(inputs) != 1 or len(ks) != 1:
      continue
    k = ks.pop()
    offsets = sorted(leaf[1] for leaf in leaves)
    out_h, out_w = eqn.outvars[0].aval.shape[1:3]
    (source,) = inputs
    _, height, width, _ = source.aval.shape
    if (offsets == sorted(itertools.product(range(k), repeat=2))
        and out_h == height // k and out_w == width // k):
      pools[eqn.outvars[0]] = (source, k)
  # A pool inside a larger pool's tree is the larger one's business.
  return pools


def _evaluate(jaxpr, consts, args, pools: dict):
  """jax.core.eval_jaxpr, with each pool's output computed by nnx.max_pool
  from its input and the eqns only the replaced trees used left out."""
  needs = {}
  for eqn in jaxpr.eqns:
    pooled = [pools[v] for v in eqn.outvars if v in pools]
    needs[id(eqn)] = ([pooled[0][0]] if pooled else
                      [v for v in eqn.invars if isinstance(v, Var)])
  producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  live, stack = set(), [v for v in jaxpr.outvars if isinstance(v, Var)]
  while stack:
    eqn = producer.get(stack.pop())
    if eqn is not None and id(eqn) not in live:
      live.add(id(eqn))
      stack.extend(needs[id(eqn)])
  env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
  read = lambda v: env[v] if isinstance(v, Var) else v.val
  for eqn in jaxpr.eqns:
    if id(eqn) not in live:
      continue
    pooled = [v for v in eqn.outvars if v in pools]
    if pooled:
      source, k = pools[pooled[0]]
      env[pooled[0]] = nnx.max_pool(read(source), window_shape=(k, k),
                                     strides=(k, k))
      continue
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
      out = eqn.primitive.bind(*map(read, eqn.invars), **params)
    env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results
                   else [out]))
  return [read(v) for v in jaxpr.outvars]


def natural(fn: Callable) -> Callable:
  """`fn` (one array in, one out) with strided-slice max pools as max pools:
  the same values, traced afresh at every call (inside jax2onnx's trace)."""
  def run(x):
    closed = jax.make_jaxpr(fn)(x)
    pools = find_pools(closed.jaxpr)
    if not pools:
      return fn(x)
    (out,) = _evaluate(closed.jaxpr, closed.consts, [x], pools)
    return out
  return run
