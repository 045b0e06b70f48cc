"""ViT-style Transformer classifier: patch embedding and pre-LN encoder blocks.

Heads, head_dim and MLP width are explicit (per block if a list) so structured
pruning can remove attention heads and hidden units and rebuild the model.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rtjax.models.depth import kept, trim
from rtjax.models.groups import Axis, Group, per_block
from rtjax.models.registry import (DEFAULT_TENSOR_PARALLEL_RULES, KERNEL,
                                   register)


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v projections of num_heads * head_dim."""

  def __init__(self, dim: int, num_heads: int, head_dim: int,
               *, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = num_heads, head_dim
    inner = num_heads * head_dim
    self.query = nnx.Linear(dim, inner, rngs=rngs)
    self.key = nnx.Linear(dim, inner, rngs=rngs)
    self.value = nnx.Linear(dim, inner, rngs=rngs)
    self.out = nnx.Linear(inner, dim, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, tokens, _ = x.shape
    split = lambda t: t.reshape(batch, tokens, self.num_heads, self.head_dim)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim)
    weights = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.out(attended.reshape(batch, tokens, -1))


class EncoderBlock(nnx.Module):
  """x + attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int,
               *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = MultiHeadAttention(dim, num_heads, head_dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x + self.attention(self.norm1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


def _per_block(value: int | Sequence[int], depth: int, name: str) -> list[int]:
  if isinstance(value, int):
    return [value] * depth
  if len(value) != depth:
    raise ValueError(f"vit: {name} needs one entry per block ({depth}), "
                     f"got {len(value)}")
  return [int(v) for v in value]


# ---- structured pruning: heads and MLP units per block ---------------------

def _prunable_groups(args: dict) -> list[Group]:
  depth, hd = args["depth"], args["head_dim"]
  heads = per_block(args["num_heads"], depth)
  mlps = per_block(args["mlp_dim"], depth)
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


def _with_widths(args: dict, widths: dict) -> dict:
  depth = args["depth"]
  return {**args,
          "num_heads": [widths[f"blocks/{i}/heads"] for i in range(depth)],
          "mlp_dim": [widths[f"blocks/{i}/mlp"] for i in range(depth)]}


def _shallower(args: dict) -> list[dict]:
  """The last encoder block removed (its per-block widths with it)."""
  depth = args["depth"] - 1
  if depth < 1:
    return []
  return [{**args, "depth": depth, "num_heads": trim(args["num_heads"], depth),
           "mlp_dim": trim(args["mlp_dim"], depth)}]


def _droppable_blocks(args: dict) -> list[int]:
  """Every encoder block: each maps embed_dim to embed_dim around its
  residual stream."""
  return list(range(args["depth"]))


def _without_blocks(args: dict, drop) -> dict:
  keep = [i for i in range(args["depth"]) if i not in set(drop)]
  return {**args, "depth": len(keep),
          "num_heads": kept(args["num_heads"], keep),
          "mlp_dim": kept(args["mlp_dim"], keep)}


@register("vit")
class ViT(nnx.Module):
  """Patches -> linear embedding + learned positions -> encoder -> mean pool -> head."""

  # Tensor parallelism over the mesh's `model` axis, by parameter path:
  # (path regex, dimension split, counted from the end; None: replicated).
  # q/k/v and the MLP's first layer split by output units, so heads and
  # hidden units land on different devices; the attention output and the
  # MLP's second layer by input units (XLA adds the all-reduce).
  tensor_parallel_rules = (
      (r"(^|/)(query|key|value|mlp_in)/" + KERNEL, -1),
      (r"(^|/)(query|key|value|mlp_in)/bias$", -1),
      (r"(^|/)(out|mlp_out)/" + KERNEL, -2),
      (r"(^|/)(out|mlp_out)/bias$", None),
      (r"(^|/)norm[^/]*/(scale|bias)$", None),
      *DEFAULT_TENSOR_PARALLEL_RULES,
  )
  prunable_groups = staticmethod(_prunable_groups)
  with_widths = staticmethod(_with_widths)
  shallower = staticmethod(_shallower)
  block_stacks = ("blocks",)
  droppable_blocks = staticmethod(_droppable_blocks)
  without_blocks = staticmethod(_without_blocks)

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               patch_size: int = 2,
               embed_dim: int = 64,
               depth: int = 2,
               num_heads: int | Sequence[int] = 4,
               head_dim: int = 16,
               mlp_dim: int | Sequence[int] = 128,
               *,
               rngs: nnx.Rngs):
    height, width, channels = input_shape
    if height % patch_size or width % patch_size:
      raise ValueError(f"vit: patch_size {patch_size} does not divide the "
                       f"{height}x{width} input")
    num_patches = (height // patch_size) * (width // patch_size)
    self.patch_embed = nnx.Conv(channels, embed_dim, (patch_size, patch_size),
                                strides=patch_size, padding="VALID", rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, num_patches, embed_dim)))
    heads = _per_block(num_heads, depth, "num_heads")
    mlps = _per_block(mlp_dim, depth, "mlp_dim")
    self.blocks = nnx.List([
        EncoderBlock(embed_dim, h, head_dim, m, rngs=rngs)
        for h, m in zip(heads, mlps)
    ])
    self.norm = nnx.LayerNorm(embed_dim, rngs=rngs)
    self.head = nnx.Linear(embed_dim, num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = self.patch_embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))
