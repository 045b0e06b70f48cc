"""Decoder-only Transformer over tokens, for next-token prediction.

Token embedding -> blocks of pre-norm (RMSNorm) causal self-attention with
rotary positions (RoPE) and an MLP (GELU, or gated SiLU: SwiGLU) -> RMSNorm
-> logits through the embedding itself (tied). Attention may be grouped
(GQA: fewer key/value heads than query heads, each shared by a group of
query heads), which shrinks the key/value cache a generation engine keeps.
Input (batch, T) int32 tokens; output (batch, T, vocabulary) logits, where
position t predicts token t + 1. No biases; no position table (RoPE
rotates queries and keys by position), so nothing fixes T but the config.

Generation runs the same modules over a key/value cache (`__call__` with
`cache`): each call writes its tokens' keys and values at their positions,
then attends over the cache a chunk of CACHE_CHUNK positions at a time, up
to the furthest position asked, so one compiled step serves every position
and a short context reads only the chunks it fills. Once the furthest
position passes half the cache, a caller may read the whole cache at once
instead (`whole_cache`, `reads_whole_cache`).

Prunable, per block: key/value heads (each takes its group of query heads
with it) and MLP units; whole blocks drop around the residual stream.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.models.depth import kept, trim
from rtjax.models.groups import Axis, Group, per_block
from rtjax.models.registry import (DEFAULT_TENSOR_PARALLEL_RULES, KERNEL,
                                   register)

ROPE_BASE = 10000.0
CACHE_CHUNK = 64  # cache positions one step of cached attention reads


def rotary(x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
  """x (batch, T, heads, head_dim) rotated by each token's position
  (batch, T): pairs (i, i + head_dim/2) turn by position / base^(2i/d)."""
  half = x.shape[-1] // 2
  freq = ROPE_BASE ** (-np.arange(half, dtype=np.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal self-attention, `kv_heads` key/value heads each shared by
  `groups` query heads (query columns ordered key/value head first, so one
  pruned key/value head takes a contiguous block of query columns)."""

  def __init__(self, dim: int, kv_heads: int, groups: int, head_dim: int,
               *, rngs: nnx.Rngs):
    self.kv_heads, self.groups, self.head_dim = kv_heads, groups, head_dim
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.query = linear(dim, kv_heads * groups * head_dim)
    self.key = linear(dim, kv_heads * head_dim)
    self.value = linear(dim, kv_heads * head_dim)
    self.out = linear(kv_heads * groups * head_dim, dim)

  def project(self, x: jnp.ndarray, positions: jnp.ndarray):
    """Rotated queries (batch, T, kv_heads, groups, head_dim) and keys and
    values (batch, T, kv_heads, head_dim) of the tokens x at `positions`."""
    batch, tokens, _ = x.shape
    heads = lambda y: y.reshape(batch, tokens, self.kv_heads, self.head_dim)
    q = self.query(x).reshape(batch, tokens, self.kv_heads * self.groups,
                              self.head_dim)
    q = rotary(q, positions).reshape(batch, tokens, self.kv_heads,
                                     self.groups, self.head_dim)
    return q, rotary(heads(self.key(x)), positions), heads(self.value(x))

  def attend(self, q, keys, values, visible) -> jnp.ndarray:
    """Output projection of q's attention over keys/values (batch, S, ...),
    `visible` (batch, T, S) saying which key each query may see."""
    logits = jnp.einsum("btkgd,bskd->bkgts", q, keys) / np.sqrt(self.head_dim)
    logits = jnp.where(visible[:, None, None], logits,
                       jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    attended = jnp.einsum("bkgts,bskd->btkgd", weights.astype(values.dtype),
                          values)
    return self.out(attended.reshape(*q.shape[:2], -1))

  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    q, k, v = self.project(x, positions)
    causal = positions[:, :, None] >= positions[:, None, :]
    return self.attend(q, k, v, causal)

  def cached(self, x: jnp.ndarray, positions: jnp.ndarray, cache,
             whole_cache: bool = False):
    """The tokens x at consecutive `positions` (batch, T) (each row from its
    own start), their keys and values written into `cache` (keys, values:
    each (batch, kv_heads, S, head_dim), or an int8 pair, see `store`)
    before they attend over it (chunk by chunk, or the `whole_cache` at
    once): (output, cache)."""
    q, k, v = self.project(x, positions)
    keys, values = (store(c, new, positions[:, 0])
                    for c, new in zip(cache, (k, v)))
    chunk = jax.tree.leaves(keys)[0].shape[2] if whole_cache else CACHE_CHUNK
    attended = chunked_attention(q, keys, values, positions, chunk)
    return self.out(attended.reshape(*q.shape[:2], -1)), (keys, values)


# ---- the cache's storage: float, or int8 with a scale per token and head --

def quantize(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """x (..., head_dim) as int8 values and one float32 scale per vector
  (max |x| / 127): symmetric, per token and head."""
  scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
  scale = jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)
  values = jnp.round(x.astype(jnp.float32) / scale[..., None])
  return values.astype(jnp.int8), scale


def store(stored, new: jnp.ndarray, starts: jnp.ndarray):
  """`stored` keys or values (batch, kv, S, d), or an int8 pair (values,
  scales (batch, kv, S)), with `new` (batch, T, kv, d) written from each
  row's start."""
  write = jax.vmap(lambda c, n, start:
                   jax.lax.dynamic_update_slice_in_dim(c, n, start, 1))
  heads_first = lambda n: jnp.moveaxis(n, 2, 1)
  if isinstance(stored, tuple):
    return tuple(write(c, heads_first(n), starts)
                 for c, n in zip(stored, quantize(new)))
  return write(stored, heads_first(new).astype(stored.dtype), starts)


def read(stored, start, size: int) -> jnp.ndarray:
  """Positions start..start+size of stored keys or values, as floats."""
  take = lambda c: jax.lax.dynamic_slice_in_dim(c, start, size, 2)
  if isinstance(stored, tuple):
    values, scales = stored
    return take(values).astype(jnp.float32) * take(scales)[..., None]
  return take(stored)


def reads_whole_cache(position: int, length: int, int8: bool = False) -> bool:
  """Whether a step whose furthest token sits at `position` reads a cache
  of `length` whole rather than chunk by chunk: from half the cache on,
  the loop reads most chunks anyway and its per-chunk overhead costs more
  than the unfilled rest. An `int8` cache stays chunked: a whole read
  dequantizes every position. (One-off probes on a CPU, in
  docs/floors.md.)"""
  return not int8 and position >= length // 2


def keys_read(position: int, length: int) -> int:
  """Cache positions one token at `position` attends over (whole chunks up
  to its own, or the whole cache; `reads_whole_cache`) in a cache of
  `length`."""
  if reads_whole_cache(position, length):
    return length
  chunk = min(CACHE_CHUNK, length)
  return chunk * (position // chunk + 1)


def step_flops(model: nnx.Module, keys: int) -> tuple[int, int]:
  """FLOPs of one token through a float decoder: (its matmuls: projections,
  MLP and logits; its attention over `keys` cached positions)."""
  vocabulary, dim = model.embed.embedding.shape
  matmuls, attention = 2 * vocabulary * dim, 0
  for block in model.blocks:
    matmuls += sum(2 * m.in_features * m.out_features
                   for _, m in nnx.iter_graph(block)
                   if isinstance(m, nnx.Linear))
    a = block.attention
    attention += 2 * 2 * a.kv_heads * a.groups * a.head_dim * keys
  return matmuls, attention


def chunked_attention(q, keys, values, positions,
                      chunk: int = CACHE_CHUNK) -> jnp.ndarray:
  """q (batch, T, kv, groups, d) at `positions` (batch, T) attending over
  cached keys/values (batch, kv, S, d), key s visible where s <= position;
  online softmax over chunks of `chunk` keys, only as many as the furthest
  position reaches. Returns (batch, T, kv, groups, d)."""
  batch, tokens, kv, groups, dim = q.shape
  length = jax.tree.leaves(keys)[0].shape[2]
  chunk = min(chunk, length)
  if length % chunk:
    raise ValueError(f"cache length {length} is not a multiple of {chunk}")
  scale = 1.0 / np.sqrt(dim)

  def step(i, carry):
    best, total, acc = carry
    start = i * chunk
    k = read(keys, start, chunk).astype(q.dtype)
    v = read(values, start, chunk).astype(q.dtype)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(jnp.float32) * scale
    visible = start + jnp.arange(chunk) <= positions[:, :, None]
    logits = jnp.where(visible[:, None, None], logits,
                       jnp.finfo(jnp.float32).min)
    new_best = jnp.maximum(best, logits.max(-1))
    weights = jnp.exp(logits - new_best[..., None])
    fade = jnp.exp(best - new_best)
    acc = acc * fade[..., None] + jnp.einsum(
        "bkgts,bksd->bkgtd", weights.astype(v.dtype), v).astype(jnp.float32)
    return new_best, total * fade + weights.sum(-1), acc

  shape = (batch, kv, groups, tokens)
  init = (jnp.full(shape, jnp.finfo(jnp.float32).min), jnp.zeros(shape),
          jnp.zeros((*shape, dim)))
  chunks = positions.max() // chunk + 1
  _, total, acc = jax.lax.fori_loop(0, chunks, step, init)
  out = acc / total[..., None]
  return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)


class Block(nnx.Module):
  """x + attention(norm(x)), then x + MLP(norm(x))."""

  def __init__(self, dim: int, kv_heads: int, groups: int, head_dim: int,
               mlp_dim: int, gated: bool, *, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
    self.attention = Attention(dim, kv_heads, groups, head_dim, rngs=rngs)
    self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.mlp_in = linear(dim, mlp_dim)
    self.mlp_gate = linear(dim, mlp_dim) if gated else None
    self.mlp_out = linear(mlp_dim, dim)

  def mlp(self, x: jnp.ndarray) -> jnp.ndarray:
    h = self.norm2(x)
    if self.mlp_gate is None:
      return self.mlp_out(nnx.gelu(self.mlp_in(h)))
    return self.mlp_out(nnx.silu(self.mlp_gate(h)) * self.mlp_in(h))

  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    x = x + self.attention(self.norm1(x), positions)
    return x + self.mlp(x)

  def cached(self, x: jnp.ndarray, positions: jnp.ndarray, cache,
             whole_cache: bool = False):
    attended, cache = self.attention.cached(self.norm1(x), positions, cache,
                                            whole_cache)
    x = x + attended
    return x + self.mlp(x), cache


# ---- structured pruning: key/value heads and MLP units per block -----------

def _heads(args: dict) -> tuple[list[int], list[int]]:
  """(query heads, key/value heads) per block."""
  depth = args["depth"]
  heads = [int(h) for h in per_block(args["num_heads"], depth)]
  kv = args.get("num_kv_heads")
  kv = heads if kv is None else [int(k) for k in per_block(kv, depth)]
  return heads, kv


def _prunable_groups(args: dict) -> list[Group]:
  hd = args["head_dim"]
  heads, kv = _heads(args)
  mlps = per_block(args["mlp_dim"], args["depth"])
  groups = []
  for i in range(args["depth"]):
    a, b, g = f"blocks/{i}/attention", f"blocks/{i}", heads[i] // kv[i]
    axes = [Axis(f"{a}/query/kernel", 1, block=hd * g),
            Axis(f"{a}/key/kernel", 1, block=hd),
            Axis(f"{a}/value/kernel", 1, block=hd),
            Axis(f"{a}/out/kernel", 0, block=hd * g)]
    groups.append(Group(f"{b}/heads", kv[i], axes, axes, unit=hd))
    mlp = [Axis(f"{b}/mlp_in/kernel", 1), Axis(f"{b}/mlp_out/kernel", 0)]
    if args.get("gated"):
      mlp.append(Axis(f"{b}/mlp_gate/kernel", 1))
    groups.append(Group(f"{b}/mlp", mlps[i], mlp, mlp))
  return groups


def _with_widths(args: dict, widths: dict) -> dict:
  heads, kv = _heads(args)
  kv_kept = [widths[f"blocks/{i}/heads"] for i in range(args["depth"])]
  return {**args, "num_kv_heads": kv_kept,
          "num_heads": [k * (h // v) for k, h, v in zip(kv_kept, heads, kv)],
          "mlp_dim": [widths[f"blocks/{i}/mlp"] for i in range(args["depth"])]}


PER_BLOCK = ("num_heads", "num_kv_heads", "mlp_dim")  # a value or one a block


def _shallower(args: dict) -> list[dict]:
  """Half the blocks (at least one), per-block widths trimmed with them."""
  depth = max(1, args["depth"] // 2)
  if depth == args["depth"]:
    return []
  return [{**args, "depth": depth,
           **{key: trim(args.get(key), depth) for key in PER_BLOCK}}]


def _without_blocks(args: dict, drop) -> dict:
  keep = [i for i in range(args["depth"]) if i not in set(drop)]
  return {**args, "depth": len(keep),
          **{key: kept(args.get(key), keep) for key in PER_BLOCK}}


@register("decoder")
class Decoder(nnx.Module):
  """Tokens -> embedding -> causal blocks -> RMSNorm -> tied logits."""

  input_dtype = jnp.int32  # token ids, not features
  # Tensor parallelism over the mesh's `model` axis: q/k/v and the MLP's
  # first layers split by output units (heads, hidden units), the attention
  # output and the MLP's second layer by input units (XLA adds the
  # all-reduce); the embedding, shared by input and logits, is replicated.
  tensor_parallel_rules = (
      (r"(^|/)(query|key|value|mlp_in|mlp_gate)/" + KERNEL, -1),
      (r"(^|/)(out|mlp_out)/" + KERNEL, -2),
      (r"(^|/)embed/embedding$", None),
      (r"(^|/)norm[^/]*/scale$", None),
      *DEFAULT_TENSOR_PARALLEL_RULES,
  )
  prunable_groups = staticmethod(_prunable_groups)
  with_widths = staticmethod(_with_widths)
  shallower = staticmethod(_shallower)
  block_stacks = ("blocks",)
  droppable_blocks = staticmethod(lambda args: list(range(args["depth"])))
  without_blocks = staticmethod(_without_blocks)

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               embed_dim: int = 128,
               depth: int = 4,
               num_heads: int | Sequence[int] = 4,
               num_kv_heads: int | Sequence[int] | None = None,
               head_dim: int = 32,
               mlp_dim: int | Sequence[int] = 512,
               gated: bool = False,
               *,
               rngs: nnx.Rngs):
    """`num_classes`: the vocabulary size; `input_shape`: (context,), the
    longest sequence it is trained on; `num_kv_heads`: None for one
    key/value head per query head, fewer for grouped-query attention (each
    block's must divide its num_heads); `gated`: SwiGLU instead of GELU."""
    (self.context,) = input_shape
    args = {"depth": depth, "num_heads": num_heads,
            "num_kv_heads": num_kv_heads}
    heads, kv = _heads(args)
    mlps = per_block(mlp_dim, depth)
    if len(heads) != depth or len(kv) != depth or len(mlps) != depth:
      raise ValueError(f"decoder: num_heads, num_kv_heads and mlp_dim need "
                       f"one entry per block ({depth})")
    if head_dim % 2 or any(k < 1 or h % k for h, k in zip(heads, kv)):
      raise ValueError(f"decoder: head_dim must be even (RoPE pairs) and "
                       f"each block's num_kv_heads must divide its num_heads, "
                       f"got head_dim {head_dim}, {heads} and {kv}")
    self.embed = nnx.Embed(num_classes, embed_dim, rngs=rngs)
    self.blocks = nnx.List([
        Block(embed_dim, k, h // k, head_dim, int(m), gated, rngs=rngs)
        for h, k, m in zip(heads, kv, mlps)])
    self.norm = nnx.RMSNorm(embed_dim, rngs=rngs)

  def __call__(self, tokens: jnp.ndarray, cache=None, start=None,
               whole_cache: bool = False):
    """Logits (batch, T, vocabulary) of every position's next token.

    With `cache` (as `empty_cache` makes), row b's tokens sit at positions
    start[b], start[b] + 1, ...: their keys and values are written into the
    cache and they attend over it, chunk by chunk or (`whole_cache`) all at
    once; returns (logits, cache). (One method for both, as qwix quantizes
    a model's __call__.)"""
    steps = jnp.arange(tokens.shape[1])
    if cache is None:
      positions = jnp.broadcast_to(steps, tokens.shape)
    else:
      positions = start[:, None] + steps
    x = self.embed(tokens)
    new_cache = []
    for i, block in enumerate(self.blocks):
      if cache is None:
        x = block(x, positions)
      else:
        x, layer = block.cached(x, positions, cache[i], whole_cache)
        new_cache.append(layer)
    logits = self.embed.attend(self.norm(x))
    return logits if cache is None else (logits, new_cache)

  def empty_cache(self, batch: int, length: int, dtype=jnp.float32,
                  int8: bool = False):
    """Zero keys and values, (batch, kv_heads, length, head_dim) per block
    (heads first: a head's positions are contiguous, so attention reads
    them without a transpose): `length` positions for `batch` sequences;
    with `int8`, each an int8 array and its float32 scales (batch,
    kv_heads, length)."""
    def part(b):
      shape = (batch, b.attention.kv_heads, length, b.attention.head_dim)
      if int8:
        return jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:3], jnp.float32)
      return jnp.zeros(shape, dtype)
    return [(part(b), part(b)) for b in self.blocks]
