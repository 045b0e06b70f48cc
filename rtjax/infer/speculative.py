"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a cheap
draft proposes k tokens, the target scores all of them in one pass over
k + 1 positions, and the longest prefix the target agrees with is kept,
plus one token of the target's own. Greedy rows keep the target's greedy
text; sampled rows accept a drafted token d with probability
min(1, p(d) / q(d)) and, at the first rejection, draw from the residual
max(0, p - q), so every committed token follows the target's distribution p
(q: the draft's, both after temperature, top-k and top-p).

Both functions run inside the engine's one compiled step; a row's draws are
keyed by (seed, position, stream) alone (rtjax.infer.sampling.keys), so a
request's text does not depend on what runs beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtjax.infer import sampling as sampling_lib

DRAFT, ACCEPT, RESAMPLE = 1, 2, 3  # key streams of one position


def propose(draft, cache, previous, tokens, positions, k: int, *sampling):
  """k drafted tokens (batch, k) after `tokens` at `positions`, their
  distributions (batch, k, vocabulary) and the draft's cache.

  The draft is fed the previous token again with the current one: where the
  target accepted everything last time, the draft never saw the last
  accepted token (a rewrite of the same key elsewhere). Its keys beyond the
  committed text are overwritten before they are read."""
  logits, cache = draft(jnp.stack([previous, tokens], 1), cache,
                        positions - 1)
  logit, drafted, dists = logits[:, -1], [], []
  for i in range(k):  # unrolled: k is small and fixed per executable
    token, q = sampling_lib.draw(logit, positions + 1 + i, *sampling,
                                 stream=DRAFT)
    drafted.append(token)
    dists.append(q)
    if i + 1 < k:  # the last drafted token need not be fed
      logits, cache = draft(token[:, None], cache, positions + 1 + i)
      logit = logits[:, 0]
  return jnp.stack(drafted, 1), jnp.stack(dists, 1), cache


def accepted(drafted, target_greedy, p_drafted, q_drafted, uniform,
             sampled) -> jax.Array:
  """Which drafted tokens (batch, k) the target keeps, each on its own:
  greedy rows where they equal the target's argmax, sampled rows with
  probability min(1, p / q)."""
  return jnp.where(sampled[:, None], uniform * q_drafted < p_drafted,
                   drafted == target_greedy)


def verify(logits, drafted, q, positions, temperature, *sampling):
  """The target's logits (batch, k + 1, vocabulary) over [token, drafted]
  judge the draft: (tokens (batch, k + 1), count (batch,)), the first
  `count` tokens committed: the accepted drafted prefix, then the target's
  own next token (a resample after a rejection, or one more token after
  all k were accepted). Every row greedy: no distributions at all."""
  greedy = jnp.argmax(logits, -1).astype(jnp.int32)
  none = jnp.zeros(drafted.shape, jnp.float32)
  return jax.lax.cond(
      jnp.any(temperature > 0),
      lambda: _verify(logits, drafted, q, positions, temperature, *sampling),
      lambda: _committed(drafted, greedy, accepted(
          drafted, greedy[:, :-1], none, none, none, temperature > 0)))


def _prefix(keep) -> jax.Array:
  """How many drafted tokens (batch,) are kept before the first rejection."""
  return jnp.sum(jnp.cumprod(keep, axis=1), axis=1)


def _committed(drafted, following, keep):
  """(tokens, count): the kept drafted prefix, then `following`'s token
  at the first rejection (batch, k + 1 candidates)."""
  batch, k = drafted.shape
  count = _prefix(keep)
  padded = jnp.concatenate([drafted, jnp.zeros_like(drafted[:, :1])], 1)
  chosen = jnp.take_along_axis(following, count[:, None], 1)
  tokens = jnp.where(jnp.arange(k + 1) < count[:, None], padded, chosen)
  return tokens, count + 1


def _verify(logits, drafted, q, positions, temperature, top_k, top_p, seed):
  """verify with sampled rows: the accept/resample rule."""
  batch, k = drafted.shape
  flat = lambda x: x.reshape(batch * (k + 1), *x.shape[2:])
  repeat = lambda x: jnp.repeat(x, k + 1)
  p = jax.nn.softmax(sampling_lib.allowed(
      flat(logits), repeat(temperature), repeat(top_k), repeat(top_p)),
      axis=-1).reshape(logits.shape)
  greedy = jnp.argmax(logits, -1).astype(jnp.int32)
  pick = lambda dist, tokens: jnp.take_along_axis(
      dist, tokens[..., None], -1)[..., 0]
  drafted_at = positions[:, None] + 1 + jnp.arange(k)
  uniform = jax.vmap(jax.random.uniform)(sampling_lib.keys(
      jnp.repeat(seed, k), drafted_at.reshape(-1), ACCEPT)).reshape(batch, k)
  sampled = temperature > 0
  keep = accepted(drafted, greedy[:, :k], pick(p[:, :k], drafted),
                  pick(q, drafted), uniform, sampled)
  count = _prefix(keep)
  at = lambda x: jnp.take_along_axis(
      x, count.reshape(batch, *[1] * (x.ndim - 1)), 1)[:, 0]
  q_next = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], 1)
  residual = jnp.maximum(at(p) - at(q_next), 0.0)
  residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, at(p))
  resampled = jax.vmap(jax.random.categorical)(
      sampling_lib.keys(seed, positions + 1 + count, RESAMPLE),
      jnp.log(residual))
  following = jnp.where(sampled, resampled, at(greedy)).astype(jnp.int32)
  return _committed(drafted, jnp.broadcast_to(following[:, None],
                                              (batch, k + 1)), keep)
