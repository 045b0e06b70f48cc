"""A PyTorch twin of the decoder family with its own key/value cache, on the
same weights, written as a PyTorch user would: nn.Linear, nn.RMSNorm,
F.scaled_dot_product_attention (grouped-query via enable_gqa), a cache
preallocated per layer as (batch, kv_heads, length, head_dim) tensors,
written in place; each step attends over the filled part only, the whole
batch at one position (static batching). Greedy decoding under
torch.inference_mode.

torch is imported only when a twin is built, so it stays out of rtjax's
dependencies.
"""

from __future__ import annotations

import time

import numpy as np
from flax import nnx

from rtjax.models.decoder import ROPE_BASE


def _weight(torch, layer: nnx.Linear):
  out = torch.nn.Linear(*layer.kernel.shape, bias=False)
  with torch.no_grad():
    out.weight.copy_(torch.from_numpy(np.array(layer.kernel[...]).T.copy()))
  return out


def _norm(torch, norm: nnx.RMSNorm):
  out = torch.nn.RMSNorm(norm.scale.shape[0], eps=norm.epsilon)
  with torch.no_grad():
    out.weight.copy_(torch.from_numpy(np.array(norm.scale[...])))
  return out


def _rotary(torch, x, positions):
  """x (B, heads, T, d) turned by position as rtjax.models.decoder.rotary."""
  half = x.shape[-1] // 2
  freq = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32) / half)
  angle = positions[:, None].float() * freq
  cos, sin = angle.cos(), angle.sin()
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _block(torch, block):
  """A twin of one decoder block: its forward(x, start, (keys, values))."""
  F = torch.nn.functional

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      a = block.attention
      self.kv_heads, self.heads = a.kv_heads, a.kv_heads * a.groups
      self.head_dim = a.head_dim
      self.norm1, self.norm2 = (_norm(torch, n) for n in (block.norm1,
                                                          block.norm2))
      self.q, self.k, self.v, self.o = (_weight(torch, l) for l in (
          a.query, a.key, a.value, a.out))
      self.up, self.down = (_weight(torch, l) for l in (block.mlp_in,
                                                        block.mlp_out))
      self.gate = (None if block.mlp_gate is None
                   else _weight(torch, block.mlp_gate))

    def forward(self, x, start, cache):
      batch, tokens, _ = x.shape
      positions, end = torch.arange(start, start + tokens), start + tokens
      h = self.norm1(x)
      split = lambda y, n: y.view(batch, tokens, n, self.head_dim
                                  ).transpose(1, 2)
      q = _rotary(torch, split(self.q(h), self.heads), positions)
      keys, values = cache
      keys[:, :, start:end] = _rotary(torch, split(self.k(h), self.kv_heads),
                                      positions)
      values[:, :, start:end] = split(self.v(h), self.kv_heads)
      attended = F.scaled_dot_product_attention(
          q, keys[:, :, :end], values[:, :, :end],
          is_causal=tokens > 1, enable_gqa=True)
      x = x + self.o(attended.transpose(1, 2).reshape(batch, tokens, -1))
      h = self.norm2(x)
      hidden = (F.gelu(self.up(h), approximate="tanh") if self.gate is None
                else F.silu(self.gate(h)) * self.up(h))
      return x + self.down(hidden)

  return Block()


def decoder_twin(model: nnx.Module):
  """The torch module of a float decoder (rtjax.models.decoder.Decoder):
  twin(tokens (B, T) int64, start, cache) -> logits (B, T, vocabulary),
  writing the tokens' keys and values at start..start+T-1 (a prompt from
  position 0, or one token per sequence)."""
  import torch

  class Twin(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = torch.nn.Embedding(*model.embed.embedding.shape)
      with torch.no_grad():
        self.embed.weight.copy_(torch.from_numpy(
            np.array(model.embed.embedding[...])))
      self.blocks = torch.nn.ModuleList(_block(torch, b) for b in model.blocks)
      self.norm = _norm(torch, model.norm)

    def empty_cache(self, batch: int, length: int):
      return [tuple(torch.zeros(batch, b.kv_heads, length, b.head_dim)
                    for _ in "kv") for b in self.blocks]

    def forward(self, tokens, start: int, cache):
      if tokens.shape[1] > 1 and start:
        raise ValueError("the twin prefills from position 0 only")
      x = self.embed(tokens)
      for block, layer in zip(self.blocks, cache):
        x = block(x, start, layer)
      return self.norm(x) @ self.embed.weight.T

  return Twin().eval()


def greedy(twin, prompts: np.ndarray, count: int
           ) -> tuple[np.ndarray, list[float]]:
  """`count` greedy tokens for each of the equal-length prompts (B, L),
  side by side: (tokens (B, count), perf_counter time of each step's
  tokens on the host)."""
  import torch
  batch, length = prompts.shape
  times = []
  with torch.inference_mode():
    cache = twin.empty_cache(batch, length + count)
    logits = twin(torch.from_numpy(prompts.astype(np.int64)), 0, cache)
    out = [logits[:, -1].argmax(-1)]
    times.append(time.perf_counter())
    for step in range(count - 1):
      logits = twin(out[-1][:, None], length + step, cache)
      out.append(logits[:, -1].argmax(-1))
      out[-1].numpy()  # on the host, as the engine's tokens are
      times.append(time.perf_counter())
  return torch.stack(out, 1).numpy(), times
