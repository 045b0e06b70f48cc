"""A serving function: a model rebuilt from its checkpoint, BatchNorm folded,
AOT-compiled for declared batch buckets from abstract weights (see
rtjax.infer.program), then its weights placed on the mesh once.

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
from rtjax.infer import program as program_lib
from rtjax.infer.fold import fold_batchnorm
from rtjax.checkpoint import load_checkpoint
from rtjax.errors import FlagError, InputError
from rtjax.models.registry import input_dtype, tensor_parallel_rules

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)



def bucket_for(batch_sizes: Sequence[int], rows: int) -> int:
  """The smallest of the sorted `batch_sizes` holding `rows` (else the
  largest): the bucket a batch of `rows` is padded into."""
  index = bisect.bisect_left(batch_sizes, rows)
  return batch_sizes[min(index, len(batch_sizes) - 1)]

class CompiledModel:
  """A model served per batch bucket, built in named steps: options resolved
  and checked, the served model prepared (widened, BatchNorm folded), one
  program per conv lowering, each bucket compiled from abstract weights,
  then the weights placed on the mesh (`place`), apart from compiling."""

  def __init__(self, model: nnx.Module, input_shape: Sequence[int],
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
               mesh: jax.sharding.Mesh | None = None,
               spec: dict | None = None, round_widths_to: int | None = None,
               conv_lowering: str | Mapping[str, tuple[int, int]] | None = None,
               embed_weights: bool | None = None, dtype: str | None = None,
               dot_kernels: str | None = None, metadata: dict | None = None,
               place: bool = True):
    """Serving options left None follow rtjax.infer.options.resolve: what
    `metadata` (the checkpoint's) recorded for the mesh's kind of device,
    else that kind's default; the result is kept in `.options`.

    `model` may be abstract (`nnx.eval_shape(lambda: Model(...))`) and
    `mesh` span devices that are not attached (a TPU slice from
    jax.experimental.topologies): compiling needs shapes, dtypes and
    shardings alone. With `place=False` nothing goes to a device;
    `place(model)` later puts the weights there.

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
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    self.metadata: dict | None = metadata
    self._resolve_options(
        {"dtype": dtype, "conv_lowering": conv_lowering,
         "embed_weights": embed_weights, "round_widths_to": round_widths_to,
         "dot_kernels": dot_kernels}, model, spec)
    self._check_buckets(input_shape, batch_sizes)
    self.input_dtype = np.dtype(input_dtype(model))
    self._rules, self._spec = tensor_parallel_rules(model), spec
    self.programs = self._programs(self._served_model(model, spec))
    self._compile()
    self.states: dict[int, object] = {}
    if place:
      self.place()

  def _resolve_options(self, explicit: dict, model: nnx.Module,
                       spec: dict | None) -> None:
    """`.options` for the mesh's kind of device, each checked against the
    model and mesh: a FlagError names the option and what fits."""
    kind = options_lib.device_kind(self.mesh.devices.flat[0].platform)
    self.options = options_lib.resolve(explicit, self.metadata, kind)
    conv_lowering = self.options["conv_lowering"]
    try:
      self.compiler_options = options_lib.compiler_options(
          self.options["dot_kernels"], kind)
      self.dtype = jnp.dtype(precision.parse_dtype(self.options["dtype"]))
      if isinstance(conv_lowering, str):
        conv_lowering = lowering_lib.parse_lowering(conv_lowering)
    except ValueError as e:
      raise FlagError(str(e)) from None
    if self.dtype != jnp.float32 and not program_lib.is_float_model(model):
      raise FlagError(f"dtype {self.options['dtype']} serves float models; "
                      "this one is quantized (int8): serve it with dtype "
                      "float32")
    if self.options["round_widths_to"] and (
        not spec or spec.get("quantization")):
      raise FlagError("round_widths_to needs the float model's spec "
                      "(metadata['model']) and no quantization")
    if isinstance(conv_lowering, str) and conv_lowering not in ("xla", "auto"):
      raise FlagError(f"conv_lowering {conv_lowering!r}: use 'xla', 'auto' "
                      f"or a {{layer path: (rows, cols)}} mapping")
    if conv_lowering == "auto" and program_lib.is_abstract(model):
      raise FlagError("conv_lowering 'auto' times each candidate on the "
                      "attached devices: give the model's weights, or pin "
                      "a lowering")
    self._lowering_option = conv_lowering
    self.embed_weights = self.options["embed_weights"]
    if self.embed_weights and self.mesh.shape[mesh_lib.MODEL] > 1:
      raise FlagError("embed_weights copies every weight into the program, "
                      "so a model axis could not split them: use a mesh "
                      "without one, or embed_weights=False")

  def _check_buckets(self, input_shape: Sequence[int],
                     batch_sizes: Sequence[int]) -> None:
    """Sorted positive buckets that divide over the mesh's data axis."""
    self.input_shape = tuple(int(d) for d in input_shape)
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
    self.input_sharding = mesh_lib.batch_sharding(self.mesh)

  def _served_model(self, model: nnx.Module, spec: dict | None) -> nnx.Module:
    """Widened (round_widths_to) and BatchNorm-folded: what is served."""
    multiple = self.options["round_widths_to"]
    if multiple:
      from rtjax.compress.structured import widen  # serving-only option
      model = program_lib.transformed(
          model, lambda m: widen(m, spec["name"], spec["args"], multiple)[0],
          "round_widths_to")
    return program_lib.transformed(model, fold_batchnorm, "BatchNorm folding")

  def _programs(self, served: nnx.Module,
                lowerings: Mapping[int, lowering_lib.Lowering] | None = None
                ) -> dict[int, program_lib.Program]:
    """{batch: program}, one program per distinct conv lowering. The
    lowering per batch is `lowerings`' or the option's ("auto": timed
    here, the choice kept in `.conv_lowering`)."""
    if lowerings is None:
      self.conv_lowering, self.lowering_trials = {}, {}
      for batch in self.batch_sizes:
        self.conv_lowering[batch] = self._choose_lowering(served, batch)
      lowerings = self.conv_lowering
    programs, by_lowering = {}, {}
    for batch in self.batch_sizes:
      key = tuple(sorted(lowerings[batch].items()))
      if key not in by_lowering:
        by_lowering[key] = self._program(program_lib.transformed(
            served, lambda m: lowering_lib.apply_lowering(
                m, self.input_shape, lowerings[batch]),
            f"conv lowering {lowering_lib.describe(lowerings[batch])}"))
      programs[batch] = by_lowering[key]
    return programs

  def _choose_lowering(self, served: nnx.Module,
                       batch: int) -> lowering_lib.Lowering:
    option = self._lowering_option
    if option == "auto":
      lowering, self.lowering_trials[batch] = lowering_lib.choose_lowering(
          served, self.input_shape, lambda m: self._blocking_call(m, batch),
          self._time_pair)
      return lowering
    return {} if option == "xla" else lowering_lib.as_lowering(option)

  def _program(self, model: nnx.Module) -> program_lib.Program:
    return program_lib.build(model, self.input_shape, self.mesh, self.dtype,
                             self._rules, self.embed_weights)

  def _compile(self) -> None:
    """`.executables` and `.compile_seconds` per batch, from the programs'
    abstract weights: nothing is placed on a device."""
    self.executables, self.compile_seconds = {}, {}
    for batch, program in self.programs.items():
      start = time.perf_counter()
      self.executables[batch] = program.compile(batch, self.compiler_options)
      self.compile_seconds[batch] = time.perf_counter() - start

  def place(self, model: nnx.Module | None = None) -> None:
    """Puts the weights on the mesh, once per program, for every call: the
    weights compiled from, or `model`'s (the values of the abstract model
    compiled from: the same shapes and dtypes, prepared the same way)."""
    programs = self.programs
    if model is not None:
      if self.embed_weights:
        raise FlagError("embedded weights are constants of the executables: "
                        "there are no others to place")
      programs = self._programs(self._served_model(model, self._spec),
                                self.conv_lowering)
      if any(jax.tree.flatten(programs[b].abstract_weights()) !=
             jax.tree.flatten(self.programs[b].abstract_weights())
             for b in programs):
        raise FlagError("the weights placed are not those compiled for "
                        "(their shapes, dtypes or shardings differ)")
    placed = {}
    for batch, program in programs.items():
      if id(program) not in placed:
        placed[id(program)] = program.place()
      self.states[batch] = placed[id(program)]

  def _blocking_call(self, model: nnx.Module, batch: int):
    """`model` compiled as served for `batch` rows: a call on zeros that
    blocks until done (a conv lowering candidate)."""
    program = self._program(model)
    compiled, state = (program.compile(batch, self.compiler_options),
                       program.place())
    images = jax.make_array_from_process_local_data(
        self.input_sharding, np.zeros((batch // self.num_processes,
                                       *self.input_shape), self.input_dtype))
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
    images = np.asarray(images, self.input_dtype)
    if images.shape[1:] != self.input_shape:
      raise InputError(f"inputs of shape {images.shape[1:]} given to a model "
                       f"compiled for {self.input_shape}")
    if not self.states:
      raise RuntimeError("compiled but not placed: call place() first")
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
      padded = np.zeros((local, *self.input_shape), self.input_dtype)
      padded[:count] = rows
    if self.num_processes == 1:
      out = self.executables[bucket](self.states[bucket], padded)
    else:
      out = multihost_utils.process_allgather(
          self.run_bucket(jax.make_array_from_process_local_data(
              self.input_sharding, padded)), tiled=True)
    out = np.asarray(out)
    return out.reshape(self.num_processes, local, *out.shape[1:])[:, :count]
