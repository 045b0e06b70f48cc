"""Transformer over a (time, features) sequence: each step is a token.

The ViT's encoder blocks (rtjax.models.vit) over the steps, after a
Linear(features -> embed_dim) and a learned or sinusoidal position
embedding, optionally causal (each step attends to itself and the past, so
the last token sees the whole sequence and an online server can classify
any prefix: `step` feeds it one step at a time against cached keys and
values, which rtjax.infer.streaming serves). The parameter names are the ViT's, so its pruning groups (heads,
MLP units per block) apply unchanged; the embedding width is kept.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.models.groups import per_block
from rtjax.models.registry import full_args, register
from rtjax.models.vit import EncoderBlock, ViT

POSITIONS = ("learned", "sinusoidal")
HEADS = ("auto", "mean", "last")


def sinusoidal_positions(steps: int, dim: int) -> np.ndarray:
  """(steps, dim) sines and cosines of geometric frequencies (Vaswani et
  al.): a constant, so it adds no parameters and no checkpoint entry."""
  position = np.arange(steps)[:, None]
  freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
  table = np.zeros((steps, dim), np.float32)
  table[:, 0::2] = np.sin(position * freq)
  table[:, 1::2] = np.cos(position * freq[:dim // 2])
  return table


class Block(EncoderBlock):
  """vit.EncoderBlock with an optional causal mask; unmasked, it is the
  ViT's block itself."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int,
               causal: bool, *, rngs: nnx.Rngs):
    super().__init__(dim, num_heads, head_dim, mlp_dim, rngs=rngs)
    self.causal = causal

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if not self.causal:
      return super().__call__(x)
    x = x + self._causal_attention(self.norm1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))

  def step(self, x: jnp.ndarray, keys: jnp.ndarray, values: jnp.ndarray,
           t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One new token x (batch, 1, dim) at position t against the cached keys
    and values of tokens 0..t-1 (batch, steps, heads, head_dim): the causal
    block's output for that token, and the caches with it written in."""
    a = self.attention
    h = self.norm1(x)
    split = lambda y: y.reshape(y.shape[0], 1, a.num_heads, a.head_dim)
    keys = jax.lax.dynamic_update_slice_in_dim(keys, split(a.key(h)), t, 1)
    values = jax.lax.dynamic_update_slice_in_dim(values, split(a.value(h)),
                                                 t, 1)
    logits = (jnp.einsum("bqhd,bkhd->bhqk", split(a.query(h)), keys)
              / jnp.sqrt(a.head_dim))
    seen = jnp.arange(keys.shape[1]) <= t
    logits = jnp.where(seen, logits, jnp.finfo(logits.dtype).min)
    attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1),
                          values)
    x = x + a.out(attended.reshape(x.shape[0], 1, -1))
    x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))
    return x, keys, values

  def _causal_attention(self, x: jnp.ndarray) -> jnp.ndarray:
    """vit.MultiHeadAttention's computation with future steps masked out."""
    a = self.attention
    batch, tokens, _ = x.shape
    split = lambda t: t.reshape(batch, tokens, a.num_heads, a.head_dim)
    q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(a.head_dim)
    mask = jnp.tril(jnp.ones((tokens, tokens), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return a.out(attended.reshape(batch, tokens, -1))


@register("transformer1d")
class Transformer1D(nnx.Module):
  """Linear embedding + positions -> encoder blocks -> LayerNorm -> mean
  over steps or the last step -> head."""

  tensor_parallel_rules = ViT.tensor_parallel_rules

  @staticmethod
  def prunable_groups(args: dict):
    return ViT.prunable_groups(full_args(Transformer1D, args))

  @staticmethod
  def with_widths(args: dict, widths: dict) -> dict:
    return ViT.with_widths(full_args(Transformer1D, args), widths)

  shallower = staticmethod(ViT.shallower)  # the same encoder blocks
  block_stacks = ViT.block_stacks
  droppable_blocks = staticmethod(ViT.droppable_blocks)
  without_blocks = staticmethod(ViT.without_blocks)

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               embed_dim: int = 32,
               depth: int = 2,
               num_heads: int | Sequence[int] = 4,
               head_dim: int = 8,
               mlp_dim: int | Sequence[int] = 64,
               positions: str = "learned",
               causal: bool = False,
               head: str = "auto",
               patch_size: int = 1,
               *,
               rngs: nnx.Rngs):
    """`positions`: 'learned' or 'sinusoidal'; `head`: 'mean' over steps,
    'last' step, or 'auto' (last when causal, else mean); `patch_size`:
    consecutive steps per token (ViT's patches in time: fewer tokens, so
    cheaper attention)."""
    steps, features = input_shape
    if patch_size < 1 or steps % patch_size:
      raise ValueError(f"transformer1d: patch_size must divide the {steps} "
                       f"steps, got {patch_size}")
    self.patch_size = patch_size
    steps, features = steps // patch_size, features * patch_size
    self.tokens, self.embed_dim, self.causal = steps, embed_dim, causal
    if positions not in POSITIONS:
      raise ValueError(f"transformer1d: positions must be one of {POSITIONS}, "
                       f"got {positions!r}")
    if head not in HEADS:
      raise ValueError(f"transformer1d: head must be one of {HEADS}, "
                       f"got {head!r}")
    heads, mlps = per_block(num_heads, depth), per_block(mlp_dim, depth)
    if len(heads) != depth or len(mlps) != depth:
      raise ValueError(f"transformer1d: num_heads and mlp_dim need one entry "
                       f"per block ({depth}), got {heads} and {mlps}")
    self.embed = nnx.Linear(features, embed_dim, rngs=rngs)
    if positions == "learned":
      self.position = nnx.Param(
          0.02 * jax.random.normal(rngs.params(), (1, steps, embed_dim)))
    else:
      self.position = None  # sinusoidal: a constant, added in __call__
    self.blocks = nnx.List([
        Block(embed_dim, int(h), head_dim, int(m), causal, rngs=rngs)
        for h, m in zip(heads, mlps)])
    self.norm = nnx.LayerNorm(embed_dim, rngs=rngs)
    self.last_token = head == "last" or (head == "auto" and causal)
    self.head = nnx.Linear(embed_dim, num_classes, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Any prefix of the sequence too (a causal model's prediction so far)."""
    batch, steps, features = x.shape
    x = x.reshape(batch, steps // self.patch_size, self.patch_size * features)
    x = self.embed(x) + self._positions()[:, :x.shape[1]]
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return self.head(x[:, -1] if self.last_token else x.mean(axis=1))

  def _positions(self) -> jnp.ndarray:
    """(1, tokens, embed_dim) position embeddings of every token."""
    if self.position is None:
      return jnp.asarray(sinusoidal_positions(self.tokens, self.embed_dim))[None]
    return self.position[...]

  # ---- streaming: a causal model fed one step at a time ---------------------

  def stream_refusal(self) -> str | None:
    """Why this model cannot be streamed a step at a time, or None."""
    if not self.causal:
      return ("every step attends to later steps; train it with causal=True "
              "to stream it")
    if self.patch_size != 1:
      return (f"its tokens are {self.patch_size} steps each; train it with "
              "patch_size=1 to stream it a step at a time")
    if not self.last_token:
      return ("its head averages every step's output; train it with "
              "head='last' (causal=True's default) to stream it")
    return None

  def initial_carry(self, batch: int) -> tuple:
    """Position 0 and empty key/value caches, one pair per block."""
    cache = lambda block: jnp.zeros(
        (batch, self.tokens, block.attention.num_heads,
         block.attention.head_dim), jnp.float32)
    return (jnp.zeros((), jnp.int32),
            tuple((cache(b), cache(b)) for b in self.blocks))

  def step(self, carry: tuple, x_t: jnp.ndarray) -> tuple[tuple, jnp.ndarray]:
    """The next step (batch, features) through every block, attending to the
    cached past: (new carry, the top block's output for this step)."""
    t, caches = carry
    x = self.embed(jnp.asarray(x_t))[:, None]
    x = x + jax.lax.dynamic_slice_in_dim(self._positions(), t, 1, 1)
    new = []
    for block, (keys, values) in zip(self.blocks, caches):
      x, keys, values = block.step(x, keys, values, t)
      new.append((keys, values))
    return (t + 1, tuple(new)), x[:, 0]

  def readout(self, outputs) -> jnp.ndarray:
    """Logits from the outputs of the steps so far (the last one's)."""
    return self.head(self.norm(outputs[-1]))
