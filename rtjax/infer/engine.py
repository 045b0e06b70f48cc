"""A decoding engine for a decoder language model, in JetStream's split:
`prefill` a prompt into a cache of its own, `insert` it into a free slot,
`generate` one token for every slot at once, `free` a slot.

Every executable is compiled ahead of time, once: one `prefill` per
prompt-length bucket (a longer prompt is fed in pieces, each at its offset),
one `insert` and one `generate` step that serves every position (the slots
hold different positions; attention reads the cache up to the furthest one,
rtjax.models.decoder). The key/value cache is donated to each call, so it is
updated in place. Sampling parameters are per-slot arrays inside the step
(rtjax.infer.sampling).

On a mesh, slots split over `data` and key/value heads over `model` (with
the family's tensor-parallel weight rules); a block whose key/value heads do
not divide over `model` keeps its cache whole there.
"""

from __future__ import annotations

import dataclasses
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
from rtjax.models.registry import tensor_parallel_rules

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class Prefilled:
  """A prompt in its own cache (batch 1), with the first token it gave."""
  cache: list
  length: int  # prompt tokens: the first token's position
  token: int
  sampling: sampling_lib.Sampling


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
  `context` tokens of `model` (a decoder, float or qwix-quantized)."""

  def __init__(self, model: nnx.Module, context: int,
               metadata: dict | None = None, slots: int = 8,
               buckets: Sequence[int] | None = None, mesh: Mesh | None = None,
               dtype: str | None = None, dot_kernels: str | None = None,
               kv_cache: str | None = None, vocabulary: str = ""):
    """Options left None follow rtjax.infer.options.resolve (an explicit
    choice, else the checkpoint's `metadata` for this kind of device, else
    its default). `vocabulary`: token i is its i-th character (default:
    the checkpoint's dataset's)."""
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    self.context, self.slots = int(context), int(slots)
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
      served = precision.with_dtype(model, self.dtype)
      compiler_options = options_lib.compiler_options(
          self.options["dot_kernels"], kind)
    except ValueError as e:
      raise FlagError(str(e)) from None
    self.graphdef, state = nnx.split(served)
    shardings = mesh_lib.weight_shardings(state, self.mesh,
                                          tensor_parallel_rules(model))
    self.weights = jax.device_put(state, shardings)
    cache_dtype = (self.dtype if precision.is_float_model(model)
                   else jnp.float32)
    int8 = self.options["kv_cache"] == "int8"
    # Zero keys and values for `batch` sequences, as this engine stores them.
    self.empty_cache = lambda batch: served.empty_cache(
        batch, self.context, cache_dtype, int8)
    self.cache_bytes = sum(  # per slot
        a.size * a.dtype.itemsize
        for a in jax.tree.leaves(jax.eval_shape(lambda: self.empty_cache(1))))
    self._compile(shardings, compiler_options)
    self.cache = self._zeros["slots"]()
    self._active = np.zeros(self.slots, bool)
    self._tokens = np.zeros(self.slots, np.int32)
    self._positions = np.zeros(self.slots, np.int32)
    self._sampling = sampling_lib.as_arrays([sampling_lib.GREEDY] *
                                            self.slots)

  @classmethod
  def from_checkpoint(cls, path: epath.PathLike, **kwargs) -> "Engine":
    """Rebuilt from a decoder's checkpoint alone (context: its own)."""
    return cls(*load_decoder(path), **kwargs)

  # ---- compiling -----------------------------------------------------------

  def _cache_shardings(self, batch_axis):
    """Each cache array (batch, positions, kv_heads, ...) split over
    `batch_axis` and, where its heads divide, over `model`."""
    model_size = self.mesh.shape[mesh_lib.MODEL]
    return jax.tree.map(lambda s: NamedSharding(self.mesh, P(
        batch_axis, None,
        mesh_lib.MODEL if s.shape[2] % model_size == 0 else None,
        *[None] * (s.ndim - 3))),
        jax.eval_shape(lambda: self.empty_cache(1)))

  def _steps(self):
    """The three programs: prefill a piece of a prompt, generate a token
    for every slot, insert a prompt's cache into a slot."""
    graphdef = self.graphdef

    def prefill(weights, cache, tokens, start, last, *sampling):
      logits, cache = nnx.merge(graphdef, weights)(tokens, cache, start)
      final = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
      return cache, sampling_lib.sample(final, start + last + 1, *sampling)

    def generate(weights, cache, tokens, positions, *sampling):
      logits, cache = nnx.merge(graphdef, weights)(tokens[:, None], cache,
                                                   positions)
      return cache, sampling_lib.sample(logits[:, 0], positions + 1,
                                        *sampling)

    def insert(cache, prompt, slot):
      return jax.tree.map(
          lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, slot, 0),
          cache, prompt)

    return prefill, generate, insert

  def _compile(self, weight_shardings, compiler_options) -> None:
    """Every executable, ahead of time, from shapes and shardings; seconds
    of each in `.compile_seconds` ({'prefill/<bucket>', 'insert',
    'generate', 'zeros/...'})."""
    prefill, generate, insert = self._steps()
    slots_cache = self._cache_shardings(mesh_lib.DATA)
    prompt_cache = self._cache_shardings(None)
    per_slot = NamedSharding(self.mesh, P(mesh_lib.DATA))
    whole = NamedSharding(self.mesh, P())
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding)
    weights = jax.tree.map(lambda w, s: spec(w.shape, w.dtype, s),
                           self.weights, weight_shardings)
    cache_spec = lambda batch, shardings: jax.tree.map(
        lambda s, sh: spec(s.shape, s.dtype, sh),
        jax.eval_shape(lambda: self.empty_cache(batch)), shardings)
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
    jobs["generate"] = (
        jax.jit(generate, donate_argnums=1,
                out_shardings=(slots_cache, per_slot)),
        (weights, cache_spec(self.slots, slots_cache), row(jnp.int32),
         row(jnp.int32), *(row(d) for _, d in sampling_lib.FIELDS)))
    for name, batch, shardings in (("slots", self.slots, slots_cache),
                                   ("prompt", 1, prompt_cache)):
      jobs[f"zeros/{name}"] = (jax.jit(lambda b=batch: self.empty_cache(b),
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
          self.weights, cache, piece, np.array([offset], np.int32),
          np.array([len(chunk) - 1], np.int32), *arrays.values())
      offset += bucket
    return Prefilled(cache, len(prompt), int(np.asarray(token)[0]), sampling)

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
    self._tokens[slot] = prefilled.token
    self._positions[slot] = prefilled.length
    self._set_sampling(slot, prefilled.sampling)

  def generate(self) -> np.ndarray:
    """One token for every slot (slots,): each active slot's next token, at
    the position after its last; rows of free slots mean nothing."""
    if (self._positions[self._active] >= self.context).any():
      raise RuntimeError(f"a slot is at the end of its context "
                         f"({self.context}); free it")
    self.cache, tokens = self.executables["generate"](
        self.weights, self.cache, self._tokens, self._positions,
        *self._sampling.values())
    tokens = np.asarray(tokens)
    self._tokens = np.where(self._active, tokens, 0).astype(np.int32)
    self._positions += self._active
    return tokens

  def free(self, slot: int) -> None:
    self._active[slot] = False
    self._tokens[slot] = self._positions[slot] = 0
    self._set_sampling(slot, sampling_lib.GREEDY)

  def _set_sampling(self, slot: int, sampling: sampling_lib.Sampling) -> None:
    for name, values in sampling_lib.as_arrays([sampling]).items():
      self._sampling[name][slot] = values[0]
