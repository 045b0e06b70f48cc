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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from rtjax.infer import mesh as mesh_lib
from rtjax.infer.fold import fold_batchnorm
from rtjax.train.checkpointing import load_checkpoint

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)


class CompiledModel:

  def __init__(self, model: nnx.Module, input_shape: Sequence[int],
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
               mesh: jax.sharding.Mesh | None = None,
               spec: dict | None = None, round_widths_to: int = 0):
    """`round_widths_to` pads every filter/unit/head group of a float model
    (described by `spec`, its checkpoint's metadata['model']) with zero units
    to a multiple of it: the same outputs on hardware-friendly widths."""
    if round_widths_to:
      if not spec or spec.get("quantization"):
        raise ValueError("round_widths_to needs the float model's spec "
                         "(metadata['model']) and no quantization")
      from rtjax.compress.structured import widen  # serving-only option
      model, _ = widen(model, spec["name"], spec["args"], round_widths_to)
    self.input_shape = tuple(int(d) for d in input_shape)
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    self.batch_sizes = sorted(set(int(b) for b in batch_sizes))
    data_size = self.mesh.shape[mesh_lib.DATA]
    bad = [b for b in self.batch_sizes if b % data_size]
    if bad:
      raise ValueError(f"batch sizes {bad} do not divide over the mesh's "
                       f"data axis ({data_size}); use multiples of {data_size}")
    self.num_processes = jax.process_count()
    self.metadata: dict | None = None

    graphdef, state = nnx.split(fold_batchnorm(model))
    shardings = mesh_lib.weight_shardings(state, self.mesh)
    self.state = jax.device_put(state, shardings)  # once, for every call
    self.input_sharding = mesh_lib.batch_sharding(self.mesh)

    def forward(state, images):
      return nnx.merge(graphdef, state)(images)

    jitted = jax.jit(forward, in_shardings=(shardings, self.input_sharding),
                     out_shardings=self.input_sharding)
    self.compile_seconds: dict[int, float] = {}
    self.executables = {}
    for batch in self.batch_sizes:
      start = time.perf_counter()
      spec = jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32)
      self.executables[batch] = jitted.lower(self.state, spec).compile()
      self.compile_seconds[batch] = time.perf_counter() - start

  @classmethod
  def from_checkpoint(cls, path: epath.PathLike, **kwargs) -> "CompiledModel":
    """Rebuilt from the checkpoint alone; its metadata kept as `.metadata`."""
    model, metadata = load_checkpoint(path)
    compiled = cls(model, metadata["model"]["args"]["input_shape"],
                   spec=metadata["model"], **kwargs)
    compiled.metadata = metadata
    return compiled

  def bucket_for(self, rows: int) -> int:
    """Smallest compiled batch holding `rows` global rows (else the largest)."""
    index = bisect.bisect_left(self.batch_sizes, rows)
    return self.batch_sizes[min(index, len(self.batch_sizes) - 1)]

  def run_bucket(self, images: jax.Array) -> jax.Array:
    """The device fast path: one compiled call on an exact bucket, no padding."""
    return self.executables[images.shape[0]](self.state, images)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.shape[1:] != self.input_shape:
      raise ValueError(f"inputs of shape {images.shape[1:]} given to a model "
                       f"compiled for {self.input_shape}")
    per_call = self.batch_sizes[-1] // self.num_processes
    if len(images) <= per_call:  # the common, latency-critical case
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
      # Host arrays go straight to the executable: its own transfer is
      # cheaper than a separate jax.device_put (measured in experiments.bench).
      out = self.executables[bucket](self.state, padded)
    else:
      out = multihost_utils.process_allgather(
          self.run_bucket(jax.make_array_from_process_local_data(
              self.input_sharding, padded)), tiled=True)
    out = np.asarray(out)
    return out.reshape(self.num_processes, local, *out.shape[1:])[:, :count]
