"""Per-request sampling inside one compiled step: every parameter is an
array with a row per request, so requests with different settings share an
executable, and each draw is keyed by (request seed, position) alone, so a
request's text does not depend on what runs beside it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rtjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (argmax); else softmax(logits / temperature)
  restricted to the top_k most likely tokens (0: all) and then to the
  smallest set whose probability reaches top_p (1: all)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise InputError(f"sampling: temperature >= 0, top_k >= 0 and top_p in "
                       f"(0, 1] needed, got {self.temperature}, {self.top_k} "
                       f"and {self.top_p}")
    if not 0 <= self.seed < 2**32:
      raise InputError(f"sampling: seed must be in [0, 2**32), got "
                       f"{self.seed}")


GREEDY = Sampling()
# The arrays one compiled step takes, a row per request: (name, dtype).
FIELDS = (("temperature", np.float32), ("top_k", np.int32),
          ("top_p", np.float32), ("seed", np.uint32))


def as_arrays(rows: list[Sampling]) -> dict[str, np.ndarray]:
  """{field: array with a row per request}: what `sample` takes."""
  return {name: np.array([getattr(r, name) for r in rows], dtype)
          for name, dtype in FIELDS}


def allowed(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> jax.Array:
  """Logits (batch, vocabulary) / temperature, -inf outside each row's
  top_k and top_p set: the distribution a sampled row draws from (its
  softmax)."""
  logits = logits.astype(jnp.float32)
  vocabulary = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  ranked = -jnp.sort(-scaled, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocabulary), vocabulary)
  ranked = jnp.where(jnp.arange(vocabulary) < k[:, None], ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  # Keep a ranked token while the mass before it is below top_p: the first
  # always, then until the set reaches top_p.
  kept = jnp.sum((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None], -1)
  floor = jnp.take_along_axis(ranked, (kept - 1)[:, None], axis=-1)
  return jnp.where(scaled >= floor, scaled, -jnp.inf)


def keys(seed: jax.Array, positions: jax.Array, stream: int = 0) -> jax.Array:
  """A key per row from (seed, position) alone; `stream` separates the
  draws made for one position (speculative decoding's draft, acceptance
  and resampling)."""
  def key(s, p):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s), p)
    return jax.random.fold_in(key, stream) if stream else key
  return jax.vmap(key)(seed, positions)


def draw(logits: jax.Array, positions: jax.Array, temperature: jax.Array,
         top_k: jax.Array, top_p: jax.Array, seed: jax.Array,
         stream: int = 0) -> tuple[jax.Array, jax.Array]:
  """(the next token (batch,) int32, the distribution it was drawn from
  (batch, vocabulary)) from logits (batch, vocabulary): row b drawn with its
  own parameters and the key of (seed[b], positions[b], stream), greedy
  rows by argmax. Sorting and random bits only when a row samples: with
  every row greedy the distribution is all zeros."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    kept = allowed(logits, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(
        keys(seed, positions, stream), kept)
    return (jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32),
            jax.nn.softmax(kept, axis=-1))

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: (
      greedy, jnp.zeros(logits.shape, jnp.float32)))


def sample(logits: jax.Array, positions: jax.Array, *parameters) -> jax.Array:
  """The next token alone (see draw)."""
  return draw(logits, positions, *parameters)[0]
