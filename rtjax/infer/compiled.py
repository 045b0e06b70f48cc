"""A serving function: a model rebuilt from its checkpoint, BatchNorm folded,
weights placed on the mesh once, AOT-compiled for declared batch buckets.

A request of n rows runs on the smallest bucket >= n (zero-padded, then
trimmed); more rows than the largest bucket run as several calls. In a
multi-process run every process passes its own rows (the same count on each)
and gets back the rows of all processes, process 0's first.
"""

from __future__ import annotations

import bisect
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from rtjax.infer import lowering as lowering_lib
from rtjax.infer import mesh as mesh_lib
from rtjax.infer import options as options_lib
from rtjax.infer import precision
from rtjax.infer.fold import fold_batchnorm
from rtjax.checkpoint import load_checkpoint
from rtjax.errors import FlagError, InputError
from rtjax.models.registry import tensor_parallel_rules

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)



def bucket_for(batch_sizes: Sequence[int], rows: int) -> int:
  """The smallest of the sorted `batch_sizes` holding `rows` (else the
  largest): the bucket a batch of `rows` is padded into."""
  index = bisect.bisect_left(batch_sizes, rows)
  return batch_sizes[min(index, len(batch_sizes) - 1)]

class CompiledModel:

  def __init__(self, model: nnx.Module, input_shape: Sequence[int],
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
               mesh: jax.sharding.Mesh | None = None,
               spec: dict | None = None, round_widths_to: int | None = None,
               conv_lowering: str | Mapping[str, tuple[int, int]] | None = None,
               embed_weights: bool | None = None, dtype: str | None = None,
               dot_kernels: str | None = None, metadata: dict | None = None):
    """Serving options left None follow rtjax.infer.options.resolve: what
    `metadata` (the checkpoint's) recorded for this kind of device, else that
    kind's default; the result is kept in `.options`.

    `round_widths_to` pads every filter/unit/head group of a float model
    (described by `spec`, its checkpoint's metadata['model']) with zero units
    to a multiple of it: the same outputs on hardware-friendly widths.

    `conv_lowering`: "xla" (XLA's convolutions), "auto" (per batch size, time
    each conv as XLA's, as one patch matmul and, stride-1 2D ones, as banded
    matmuls over output blocks of several shapes, and keep the fastest; see
    rtjax.infer.lowering.choose_lowering: a compile and about 0.5 s of timing
    per candidate) or {layer path: (rows, cols) or "patches"} for every batch
    size (what "auto" chose, to pin it). The choice per batch size is kept
    in `.conv_lowering`, the timings in `.lowering_trials`.

    `embed_weights` compiles the weights into each executable as constants
    (host copies): XLA folds their layout work at compile time and a call
    passes one array, not every weight (experiments.bench_lowering measures
    it). For small models; a `model` mesh axis could not split them.

    `dtype` "bfloat16" serves a float model in bf16 (rtjax.infer.precision):
    inputs and outputs stay float32 host arrays, cast inside the program.

    `dot_kernels` "xla" runs the matmuls with XLA's own kernels on a CPU
    instead of the YNNPACK library ("ynnpack", jax's CPU default); see
    rtjax.infer.options."""
    self.options = options_lib.resolve(
        {"dtype": dtype, "conv_lowering": conv_lowering,
         "embed_weights": embed_weights, "round_widths_to": round_widths_to,
         "dot_kernels": dot_kernels}, metadata)
    dtype, conv_lowering, embed_weights, round_widths_to = (
        self.options[k] for k in ("dtype", "conv_lowering", "embed_weights",
                                  "round_widths_to"))
    try:
      self.compiler_options = options_lib.compiler_options(
          self.options["dot_kernels"])
      self.dtype = jnp.dtype(precision.parse_dtype(dtype))
      if isinstance(conv_lowering, str):
        conv_lowering = lowering_lib.parse_lowering(conv_lowering)
    except ValueError as e:
      raise FlagError(str(e)) from None
    if self.dtype != jnp.float32 and not precision.is_float_model(model):
      raise FlagError(f"dtype {dtype} serves float models; this one is "
                      "quantized (int8): serve it with dtype float32")
    if round_widths_to:
      if not spec or spec.get("quantization"):
        raise FlagError("round_widths_to needs the float model's spec "
                         "(metadata['model']) and no quantization")
      from rtjax.compress.structured import widen  # serving-only option
      model, _ = widen(model, spec["name"], spec["args"], round_widths_to)
    if isinstance(conv_lowering, str) and conv_lowering not in ("xla", "auto"):
      raise FlagError(f"conv_lowering {conv_lowering!r}: use 'xla', 'auto' "
                       f"or a {{layer path: (rows, cols)}} mapping")
    self.input_shape = tuple(int(d) for d in input_shape)
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    self.batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if not self.batch_sizes or self.batch_sizes[0] < 1:
      raise FlagError(f"batch sizes {list(batch_sizes)}: give one or more "
                      "positive batch sizes, e.g. 1,8,64,256")
    data_size = self.mesh.shape[mesh_lib.DATA]
    bad = [b for b in self.batch_sizes if b % data_size]
    if bad:
      raise FlagError(f"batch sizes {bad} do not divide over the mesh's "
                       f"data axis ({data_size}); use multiples of {data_size}")
    self.num_processes = jax.process_count()
    self.metadata: dict | None = metadata
    self.input_sharding = mesh_lib.batch_sharding(self.mesh)
    if embed_weights and self.mesh.shape[mesh_lib.MODEL] > 1:
      raise FlagError("embed_weights copies every weight into the program, "
                       "so a model axis could not split them: use a mesh "
                       "without one, or embed_weights=False")
    self.embed_weights = embed_weights

    served = fold_batchnorm(model)
    self._rules = tensor_parallel_rules(model)
    self.conv_lowering: dict[int, lowering_lib.Lowering] = {}
    self.lowering_trials: dict[int, list[dict]] = {}
    self.states, self.executables = {}, {}
    self.compile_seconds: dict[int, float] = {}
    placed = {}  # one placed copy of the weights per distinct lowering
    for batch in self.batch_sizes:
      if conv_lowering == "auto":
        lowering, self.lowering_trials[batch] = lowering_lib.choose_lowering(
            served, self.input_shape, lambda m: self._blocking_call(m, batch),
            self._time_pair)
      else:
        lowering = ({} if conv_lowering == "xla"
                    else lowering_lib.as_lowering(conv_lowering))
      self.conv_lowering[batch] = lowering
      key = tuple(sorted(lowering.items()))
      if key not in placed:
        placed[key] = self._place(lowering_lib.apply_lowering(
            served, self.input_shape, lowering))
      jitted, self.states[batch] = placed[key]
      start = time.perf_counter()
      self.executables[batch] = jitted.lower(
          self.states[batch], self._input_spec(batch)).compile(
              compiler_options=self.compiler_options)
      self.compile_seconds[batch] = time.perf_counter() - start

  def _place(self, model: nnx.Module):
    """(jitted forward, weights placed on the mesh once for every call; no
    weights to pass when they are embedded)."""
    graphdef, state = nnx.split(precision.with_dtype(model, self.dtype))
    dtype = self.dtype
    # Host arrays stay float32 at the boundary: a cast in, a cast out.
    run = (lambda m, images: m(images) if dtype == jnp.float32
           else m(images.astype(dtype)).astype(jnp.float32))
    if self.embed_weights:  # host copies become constants: no weight inputs
      constants, state = jax.tree.map(np.asarray, state), {}
      forward = lambda _, images: run(nnx.merge(graphdef, constants), images)
    else:
      forward = lambda state, images: run(nnx.merge(graphdef, state), images)
    shardings = mesh_lib.weight_shardings(state, self.mesh, self._rules)
    jitted = jax.jit(forward, in_shardings=(shardings, self.input_sharding),
                     out_shardings=self.input_sharding)
    return jitted, jax.device_put(state, shardings)

  def _input_spec(self, batch: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32)

  def _blocking_call(self, model: nnx.Module, batch: int):
    """`model` compiled as served for `batch` rows: a call on zeros that
    blocks until done (a conv lowering candidate)."""
    jitted, state = self._place(model)
    compiled = jitted.lower(state, self._input_spec(batch)).compile(
        compiler_options=self.compiler_options)
    images = jax.make_array_from_process_local_data(
        self.input_sharding, np.zeros((batch // self.num_processes,
                                       *self.input_shape), np.float32))
    return lambda: compiled(state, images).block_until_ready()

  def _time_pair(self, a, b) -> tuple[float, float]:
    """Seconds per call of two candidates timed side by side. Every process
    runs the same calls and takes process 0's times, so all of them make
    the same choices."""
    if self.num_processes == 1:
      return lowering_lib.median_seconds_in_turns(a, b)
    seconds = lowering_lib.median_seconds_in_turns(a, b, min_calls=20,
                                                   budget_s=0.0)
    return tuple(float(s) for s in multihost_utils.broadcast_one_to_all(
        np.asarray(seconds, np.float64)))

  @classmethod
  def from_checkpoint(cls, path: epath.PathLike, **kwargs) -> "CompiledModel":
    """Rebuilt from the checkpoint alone; its metadata kept as `.metadata`."""
    model, metadata = load_checkpoint(path)
    return cls(model, metadata["model"]["args"]["input_shape"],
               spec=metadata["model"], metadata=metadata, **kwargs)

  def bucket_for(self, rows: int) -> int:
    """Smallest compiled batch holding `rows` global rows (else the largest)."""
    return bucket_for(self.batch_sizes, rows)

  def run_bucket(self, images: jax.Array) -> jax.Array:
    """The device fast path: one compiled call on an exact bucket, no padding."""
    return self.executables[images.shape[0]](self.states[images.shape[0]], images)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.shape[1:] != self.input_shape:
      raise InputError(f"inputs of shape {images.shape[1:]} given to a model "
                       f"compiled for {self.input_shape}")
    rows = len(images)
    if self.num_processes == 1 and rows in self.executables:
      # The latency-critical case, no padding or trimming: host arrays go
      # straight to the executable (its own transfer is cheaper than a
      # separate jax.device_put, measured in experiments.bench).
      return np.asarray(self.executables[rows](self.states[rows], images))
    per_call = self.batch_sizes[-1] // self.num_processes
    if rows <= per_call:
      out = self._call_chunk(images)
    else:
      out = np.concatenate([self._call_chunk(images[start:start + per_call])
                            for start in range(0, len(images), per_call)],
                           axis=1)
    # (processes, rows, ...) -> all of process 0's rows first.
    return out.reshape(-1, *out.shape[2:])

  def _call_chunk(self, rows: np.ndarray) -> np.ndarray:
    count = len(rows)
    bucket = self.bucket_for(count * self.num_processes)
    local = bucket // self.num_processes
    if count == local:
      padded = rows
    else:
      padded = np.zeros((local, *self.input_shape), np.float32)
      padded[:count] = rows
    if self.num_processes == 1:
      out = self.executables[bucket](self.states[bucket], padded)
    else:
      out = multihost_utils.process_allgather(
          self.run_bucket(jax.make_array_from_process_local_data(
              self.input_sharding, padded)), tiled=True)
    out = np.asarray(out)
    return out.reshape(self.num_processes, local, *out.shape[1:])[:, :count]
