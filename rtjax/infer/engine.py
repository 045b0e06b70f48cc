"""A decoding engine for a decoder language model, in JetStream's split:
`prefill` a prompt into a cache of its own, `insert` it into a free slot,
`generate` one token for every slot at once, `free` a slot.

Every executable is compiled ahead of time, once: one `prefill` per
prompt-length bucket (a longer prompt is fed in pieces, each at its offset),
one `insert` and a `generate` step that serves every position (the slots
hold different positions; attention reads the cache chunk by chunk up to
the furthest one, rtjax.models.decoder), with a twin, `generate/whole`,
that reads the whole cache at once, taken while the furthest slot is past
half a float cache. The key/value cache is donated to each call, so it is
updated in place. Sampling parameters are per-slot arrays inside the step
(rtjax.infer.sampling).

With a draft model and `speculate=k`, each generate step is one round of
speculative decoding (rtjax.infer.speculative) in the same one executable:
the draft proposes k tokens, the target verifies them in one pass and each
slot gains 1 to k + 1 tokens. Both models keep caches (k positions longer
than the context, so a round near its end writes no further than the cache).

On a mesh, slots split over `data` and key/value heads over `model` (with
the family's tensor-parallel weight rules); a block whose key/value heads do
not divide over `model` keeps its cache whole there.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rtjax.checkpoint import load_checkpoint
from rtjax.data import tokens
from rtjax.errors import FlagError, InputError
from rtjax.infer import mesh as mesh_lib
from rtjax.infer import options as options_lib
from rtjax.infer import precision
from rtjax.infer import sampling as sampling_lib
from rtjax.infer import speculative
from rtjax.models.decoder import CACHE_CHUNK, reads_whole_cache
from rtjax.models.registry import tensor_parallel_rules

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class Prefilled:
  """A prompt in its own cache (batch 1), with the first token it gave."""
  cache: list
  length: int  # prompt tokens: the first token's position
  token: int
  sampling: sampling_lib.Sampling
  previous: int  # the prompt's last token (a draft is fed it again)


def prefill_buckets(context: int, buckets: Sequence[int] | None = None
                    ) -> list[int]:
  """Sorted prompt-length buckets for `context` (default: PREFILL_BUCKETS
  up to it). Each must be a multiple of the smallest, as must the context,
  so every piece of a long prompt fits the cache at its offset."""
  if buckets is None:
    buckets = [b for b in PREFILL_BUCKETS if b < context] + [context]
  buckets = sorted(set(int(b) for b in buckets))
  if (not buckets or buckets[0] < 1 or buckets[-1] > context
      or any(b % buckets[0] for b in buckets + [context])):
    raise FlagError(f"prefill buckets {buckets}: give lengths in [1, "
                    f"{context}] that are multiples of the smallest, as the "
                    f"context ({context}) must be")
  return buckets


def cache_length(context: int, speculate: int) -> int:
  """Positions a cache holds: the context, plus the k a speculative round
  may write past it, in whole chunks of cached attention."""
  length = context + speculate
  if speculate and length > CACHE_CHUNK:
    length = -(-length // CACHE_CHUNK) * CACHE_CHUNK
  return length


def check_draft(model, draft, speculate: int) -> int:
  """k, or a FlagError: a draft needs k >= 1 (and k a draft) and the
  target's vocabulary."""
  if (draft is None) != (speculate == 0) or speculate < 0:
    raise FlagError("speculative decoding needs a draft model and "
                    f"speculate >= 1 together (got speculate {speculate} "
                    f"and {'a' if draft else 'no'} draft)")
  if draft is not None and (draft.embed.num_embeddings
                            != model.embed.num_embeddings):
    raise FlagError(f"the draft's vocabulary ({draft.embed.num_embeddings} "
                    f"tokens) is not the target's "
                    f"({model.embed.num_embeddings})")
  return int(speculate)


def vocabulary_of(metadata: dict | None) -> str:
  """The vocabulary a checkpoint's dataset recorded (token i: its i-th
  character)."""
  return ((metadata or {}).get("dataset") or {}).get("vocabulary", "")


def encode(vocabulary: str, text: str) -> np.ndarray:
  """Token ids of `text`; an InputError names a character the vocabulary
  lacks."""
  try:
    return tokens.encode(vocabulary, text)
  except ValueError as e:
    raise InputError(str(e)) from None


def is_decoder(model: nnx.Module) -> bool:
  """A model the engine generates with: one that runs over a KV cache."""
  return hasattr(model, "empty_cache")


def load_decoder(path: epath.PathLike) -> tuple[nnx.Module, int, dict]:
  """(model, its context, metadata) of a decoder language model's
  checkpoint; a FlagError for any other model."""
  model, metadata = load_checkpoint(path)
  if not is_decoder(model):
    raise FlagError(f"{path} holds a {metadata['model']['name']} model; "
                    "generation needs a decoder language model")
  return model, metadata["model"]["args"]["input_shape"][0], metadata


class Engine:
  """prefill / insert / generate / free over `slots` sequences of up to
  `context` tokens of `model` (a decoder, float or qwix-quantized),
  speculating with `draft` (a decoder over the same vocabulary) k =
  `speculate` tokens a step when given."""

  def __init__(self, model: nnx.Module, context: int,
               metadata: dict | None = None, slots: int = 8,
               buckets: Sequence[int] | None = None, mesh: Mesh | None = None,
               dtype: str | None = None, dot_kernels: str | None = None,
               kv_cache: str | None = None, vocabulary: str = "",
               draft: nnx.Module | None = None, speculate: int = 0):
    """Options left None follow rtjax.infer.options.resolve (an explicit
    choice, else the checkpoint's `metadata` for this kind of device, else
    its default). `vocabulary`: token i is its i-th character (default:
    the checkpoint's dataset's)."""
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    self.context, self.slots = int(context), int(slots)
    self.speculate = check_draft(model, draft, speculate)
    self.cache_length = cache_length(self.context, self.speculate)
    self.buckets = prefill_buckets(self.context, buckets)
    self.vocabulary = vocabulary or vocabulary_of(metadata)
    if self.slots % self.mesh.shape[mesh_lib.DATA]:
      raise FlagError(f"{self.slots} slots do not divide over the mesh's "
                      f"data axis ({self.mesh.shape[mesh_lib.DATA]})")
    kind = options_lib.device_kind(self.mesh.devices.flat[0].platform)
    self.options = options_lib.resolve(
        {"dtype": dtype, "dot_kernels": dot_kernels, "kv_cache": kv_cache},
        metadata, kind)
    if self.options["kv_cache"] not in options_lib.KV_CACHES:
      raise FlagError(f"kv_cache {self.options['kv_cache']!r}: use one of "
                      f"{', '.join(options_lib.KV_CACHES)}")
    try:
      self.dtype = jnp.dtype(precision.parse_dtype(self.options["dtype"]))
      compiler_options = options_lib.compiler_options(
          self.options["dot_kernels"], kind)
    except ValueError as e:
      raise FlagError(str(e)) from None
    shardings = self._place(
        {"target": model, **({"draft": draft} if draft else {})})
    self.graphdef, self.weights = self.graphdefs["target"], self._weights[
        "target"]
    # The executables take the weights as a flat tuple of arrays: a call
    # then flattens no nnx State (a tenth of a millisecond each time).
    self._weight_tree = jax.tree.structure(self._weights)
    self._leaves = tuple(jax.tree.leaves(self._weights))
    self.empty_cache = self._empties["target"]
    self.cache_bytes = sum(  # per slot, every model's
        a.size * a.dtype.itemsize
        for a in jax.tree.leaves(jax.eval_shape(lambda: self._stored(1))))
    self._compile(shardings, compiler_options)
    self.cache = self._zeros["slots"]()
    self._active = np.zeros(self.slots, bool)
    # Per slot: the token before its last, its last (fed next), and that
    # one's position: one array, so one transfer a step.
    self._state = np.zeros((self.slots, 3), np.int32)
    self.drafted = self.accepted = 0  # drafted tokens, and those kept
    self._sampling = sampling_lib.as_arrays([sampling_lib.GREEDY] *
                                            self.slots)
    self._sampling_placed = None  # on the devices until a slot changes

  def _place(self, models: dict) -> dict:
    """Each model ({role: model}) in the serving dtype with its weights on
    the mesh, and how it stores its cache; returns the weights' shardings."""
    self.graphdefs, self._weights, shardings, self._empties = {}, {}, {}, {}
    for role, each in models.items():
      served = precision.with_dtype(each, self.dtype)
      self.graphdefs[role], state = nnx.split(served)
      shardings[role] = mesh_lib.weight_shardings(
          state, self.mesh, tensor_parallel_rules(each))
      self._weights[role] = jax.device_put(state, shardings[role])
      # Zero keys and values for `batch` sequences, as this engine stores
      # them.
      self._empties[role] = functools.partial(
          served.empty_cache, length=self.cache_length,
          dtype=(self.dtype if precision.is_float_model(each)
                 else jnp.float32),
          int8=self._int8_cache)
    return shardings

  @classmethod
  def from_checkpoint(cls, path: epath.PathLike, **kwargs) -> "Engine":
    """Rebuilt from a decoder's checkpoint alone (context: its own)."""
    return cls(*load_decoder(path), **kwargs)

  @property
  def acceptance(self) -> float:
    """The fraction of drafted tokens the target kept so far."""
    return self.accepted / self.drafted if self.drafted else float("nan")

  @property
  def _int8_cache(self) -> bool:
    return self.options["kv_cache"] == "int8"

  def _stored(self, batch: int) -> dict:
    """Zero caches for `batch` sequences: {role: that model's cache}."""
    return {role: empty(batch) for role, empty in self._empties.items()}

  # ---- compiling -----------------------------------------------------------

  def _cache_shardings(self, batch_axis):
    """Each cache array (batch, kv_heads, positions, ...) split over
    `batch_axis` and, where its heads divide, over `model`."""
    model_size = self.mesh.shape[mesh_lib.MODEL]
    return jax.tree.map(lambda s: NamedSharding(self.mesh, P(
        batch_axis,
        mesh_lib.MODEL if s.shape[1] % model_size == 0 else None,
        *[None] * (s.ndim - 2))),
        jax.eval_shape(lambda: self._stored(1)))

  def _steps(self):
    """The three programs: prefill a piece of a prompt, generate a token
    (or a speculative round) for every slot, insert a prompt's cache into a
    slot."""
    graphdefs, k, tree = self.graphdefs, self.speculate, self._weight_tree
    model = lambda role, leaves: nnx.merge(
        graphdefs[role], jax.tree.unflatten(tree, leaves)[role])

    def feed(leaves, cache, tokens, start, whole=False):
      """Every model over the tokens: the target's logits, the caches."""
      fed = {role: model(role, leaves)(tokens, cache[role], start, whole)
             for role in cache}
      return fed["target"][0], {role: c for role, (_, c) in fed.items()}

    def prefill(leaves, cache, tokens, start, last, *sampling):
      logits, cache = feed(leaves, cache, tokens, start)
      final = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
      return cache, sampling_lib.sample(final, start + last + 1, *sampling)

    def generate(whole, leaves, cache, state, *sampling):
      """(cache, per slot: the count of new tokens, then the tokens), each
      model reading its `whole` cache or chunks of it."""
      previous, tokens, positions = state[:, 0], state[:, 1], state[:, 2]
      if not k:
        logits, cache = feed(leaves, cache, tokens[:, None], positions, whole)
        next_token = sampling_lib.sample(logits[:, 0], positions + 1,
                                         *sampling)
        return cache, jnp.stack([jnp.ones_like(next_token), next_token], 1)
      drafted, q, draft_cache = speculative.propose(
          functools.partial(model("draft", leaves), whole_cache=whole),
          cache["draft"], previous, tokens, positions, k, *sampling)
      logits, target_cache = model("target", leaves)(
          jnp.concatenate([tokens[:, None], drafted], 1), cache["target"],
          positions, whole)
      gained, count = speculative.verify(logits, drafted, q, positions,
                                         *sampling)
      return ({"target": target_cache, "draft": draft_cache},
              jnp.concatenate([count[:, None], gained], 1))

    def insert(cache, prompt, slot):
      return jax.tree.map(
          lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, slot, 0),
          cache, prompt)

    return prefill, generate, insert

  def _compile(self, weight_shardings, compiler_options) -> None:
    """Every executable, ahead of time, from shapes and shardings; seconds
    of each in `.compile_seconds` ({'prefill/<bucket>', 'insert',
    'generate', 'generate/whole', 'zeros/...'})."""
    prefill, generate, insert = self._steps()
    slots_cache = self._cache_shardings(mesh_lib.DATA)
    prompt_cache = self._cache_shardings(None)
    per_slot = NamedSharding(self.mesh, P(mesh_lib.DATA))
    whole = NamedSharding(self.mesh, P())
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding)
    weights = tuple(jax.tree.leaves(jax.tree.map(
        lambda w, s: spec(w.shape, w.dtype, s), self._weights,
        weight_shardings)))
    cache_spec = lambda batch, shardings: jax.tree.map(
        lambda s, sh: spec(s.shape, s.dtype, sh),
        jax.eval_shape(lambda: self._stored(batch)), shardings)
    one = [spec((1,), d, whole) for _, d in sampling_lib.FIELDS]
    row = lambda dtype: spec((self.slots,), dtype, per_slot)
    jobs = {f"prefill/{b}": (
        jax.jit(prefill, donate_argnums=1,
                out_shardings=(prompt_cache, whole)),
        (weights, cache_spec(1, prompt_cache), spec((1, b), jnp.int32, whole),
         spec((1,), jnp.int32, whole), spec((1,), jnp.int32, whole), *one))
        for b in self.buckets}
    jobs["insert"] = (
        jax.jit(insert, donate_argnums=0, out_shardings=slots_cache),
        (cache_spec(self.slots, slots_cache), cache_spec(1, prompt_cache),
         spec((), jnp.int32, whole)))
    variants = {"generate": False}
    if reads_whole_cache(self.cache_length, self.cache_length,
                         self._int8_cache):  # some step reads it whole
      variants["generate/whole"] = True
    for name, reads_whole in variants.items():
      jobs[name] = (
          jax.jit(functools.partial(generate, reads_whole), donate_argnums=1,
                  out_shardings=(slots_cache, per_slot)),
          (weights, cache_spec(self.slots, slots_cache),
           spec((self.slots, 3), jnp.int32, per_slot),
           *(row(d) for _, d in sampling_lib.FIELDS)))
    self._per_slot = per_slot
    for name, batch, shardings in (("slots", self.slots, slots_cache),
                                   ("prompt", 1, prompt_cache)):
      jobs[f"zeros/{name}"] = (jax.jit(lambda b=batch: self._stored(b),
                                       out_shardings=shardings), ())
    self.executables, self.compile_seconds = {}, {}
    for name, (jitted, args) in jobs.items():
      start = time.perf_counter()
      self.executables[name] = jitted.lower(*args).compile(
          compiler_options=compiler_options)
      self.compile_seconds[name] = time.perf_counter() - start
    self._zeros = {"slots": self.executables["zeros/slots"],
                   "prompt": self.executables["zeros/prompt"]}

  # ---- the interface a scheduler drives ------------------------------------

  def encode(self, text: str) -> np.ndarray:
    return encode(self.vocabulary, text)

  def decode(self, ids) -> str:
    return tokens.decode(self.vocabulary, ids)

  def check_prompt(self, prompt: Sequence[int]) -> None:
    """An InputError unless the prompt leaves room for a token."""
    if not 1 <= len(prompt) < self.context:
      raise InputError(f"a prompt of {len(prompt)} tokens: give 1 to "
                       f"{self.context - 1} (the context is {self.context})")

  def piece(self, offset: int, remaining: int) -> int:
    """The bucket of a prompt's next piece at `offset`: the smallest that
    holds the rest and fits the cache, else the largest that fits."""
    fits = [b for b in self.buckets if offset + b <= self.context]
    return next((b for b in fits if b >= remaining), fits[-1])

  def prefill(self, prompt: Sequence[int],
              sampling: sampling_lib.Sampling = sampling_lib.GREEDY
              ) -> Prefilled:
    """The prompt's keys and values in a cache of its own, fed in pieces of
    the compiled buckets, and the first token it gives."""
    prompt = np.asarray(prompt, np.int32)
    self.check_prompt(prompt)
    cache, offset, token = self._zeros["prompt"](), 0, None
    arrays = sampling_lib.as_arrays([sampling])
    while offset < len(prompt):
      bucket = self.piece(offset, len(prompt) - offset)
      piece = np.zeros((1, bucket), np.int32)
      chunk = prompt[offset:offset + bucket]
      piece[0, :len(chunk)] = chunk
      cache, token = self.executables[f"prefill/{bucket}"](
          self._leaves, cache, piece, np.array([offset], np.int32),
          np.array([len(chunk) - 1], np.int32), *arrays.values())
      offset += bucket
    return Prefilled(cache, len(prompt), int(np.asarray(token)[0]), sampling,
                     int(prompt[-1]))

  @property
  def free_slots(self) -> list[int]:
    return [int(s) for s in np.flatnonzero(~self._active)]

  def insert(self, prefilled: Prefilled, slot: int) -> None:
    """The prefilled request takes `slot`; its next `generate` feeds it the
    first token."""
    if self._active[slot]:
      raise RuntimeError(f"slot {slot} is in use; free it first")
    self.cache = self.executables["insert"](self.cache, prefilled.cache,
                                            np.int32(slot))
    self._active[slot] = True
    self._state[slot] = prefilled.previous, prefilled.token, prefilled.length
    self._set_sampling(slot, prefilled.sampling)

  def generate(self) -> list[np.ndarray]:
    """The tokens each slot gained, in order: one per active slot (1 to
    k + 1 when speculating), none for a free slot."""
    state = self._state
    if (state[self._active, 2] >= self.context).any():
      raise RuntimeError(f"a slot is at the end of its context "
                         f"({self.context}); free it")
    if self._sampling_placed is None:
      self._sampling_placed = [jax.device_put(np.array(v), self._per_slot)
                               for v in self._sampling.values()]
    # A round reads up to k positions past its slot's.
    furthest = int(state[self._active, 2].max(initial=0)) + self.speculate
    step = ("generate/whole" if reads_whole_cache(
        furthest, self.cache_length, self._int8_cache) else "generate")
    self.cache, emitted = self.executables[step](
        self._leaves, self.cache, state, *self._sampling_placed)
    emitted = np.asarray(emitted)
    counts = np.where(self._active, emitted[:, 0], 0)
    tokens, rows = emitted[:, 1:], np.arange(self.slots)
    state[:, 0] = np.where(  # the token before each slot's last
        counts > 1, tokens[rows, np.maximum(counts - 2, 0)], state[:, 1])
    state[:, 1] = np.where(self._active,
                           tokens[rows, np.maximum(counts - 1, 0)], 0)
    state[:, 2] += counts
    if self.speculate:
      self.drafted += self.speculate * int(self._active.sum())
      self.accepted += int((counts - 1)[self._active].sum())
    return [tokens[s, :counts[s]] for s in rows]

  def free(self, slot: int) -> None:
    self._active[slot] = False
    self._state[slot] = 0
    self._set_sampling(slot, sampling_lib.GREEDY)

  def _set_sampling(self, slot: int, sampling: sampling_lib.Sampling) -> None:
    for name, values in sampling_lib.as_arrays([sampling]).items():
      self._sampling[name][slot] = values[0]
    self._sampling_placed = None
