"""Every executable a model or a checkpoint gets, compiled for a target slice
on this host: its serving executables (each batch bucket, in float32,
bfloat16 and int8) and its config's train step.

Serving compiles through rtjax.infer's CompiledModel exactly as serving
does (BatchNorm folded, weights sharded by the family's tensor-parallel
rules on a data x model mesh), with `place=False`: the weights' shapes are
all it needs. The serving options are resolved for the target's kind of
device ('tpu'), from an explicit choice, else what the checkpoint recorded
for 'tpu', else the TPU defaults, so no CPU compiler option (YNNPACK dot
kernels, a conv lowering timed on this host) reaches a TPU compile. int8 is
qwix PTQ (rtjax.compress.quantize.ptq, dynamic activation scales).

The train step is rtjax.train's own jitted step with the config's
optimizer, its state sharded as the trainer places it: weights, other
model state and optimizer state replicated on every chip, the batch's rows
split over all of them.

An executable the compiler refuses (RESOURCE_EXHAUSTED: it does not fit a
chip's HBM; a sharding it rejects) is kept with the compiler's message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding

from rtjax import models
from rtjax.checkpoint import load_checkpoint
from rtjax.compress.quantize import ptq
from rtjax.data import dataset_spec
from rtjax.infer import CompiledModel
from rtjax.infer import options as options_lib
from rtjax.infer import program as program_lib
from rtjax.target.topology import Target
from rtjax.train.metrics import TrainMetrics
from rtjax.train.optim import make_optimizer
from rtjax.train.step import CrossEntropy, train_step
from rtjax.train.trainer import Placement, model_spec

DTYPES = ("float32", "bfloat16", "int8")
SERVE, TRAIN = "serve", "train step"


@dataclasses.dataclass
class Executable:
  """One executable for a target, or the compiler's refusal (`error`).
  `compile_s` is measured on this host; nothing else here is a measurement."""
  what: str                 # SERVE or TRAIN
  dtype: str                # float32, bfloat16, int8
  batch: int                # rows per call (global, over the whole slice)
  mesh: dict[str, int]      # axis sizes
  compiled: jax.stages.Compiled | None
  error: str | None
  compile_s: float


@contextlib.contextmanager
def without_persistent_cache():
  """jax's persistent compilation cache off: an executable compiled for
  devices that are not attached cannot be loaded back from it (jax warns
  and compiles again), so writing it there only costs time and disk. jax
  decides once per process whether it uses the cache, so the decision is
  reset on the way in and out (quietly: jax logs each reset)."""
  enabled = jax.config.jax_enable_compilation_cache
  quiet = std_logging.getLogger("jax._src.compilation_cache")
  level = quiet.level
  quiet.setLevel(std_logging.WARNING)
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
    quiet.setLevel(level)


def _compile(what: str, dtype: str, batch: int, mesh: Mesh,
             build: Callable[[], jax.stages.Compiled]) -> Executable:
  """`build()` timed; a refusal by the compiler becomes the row's `error`
  (its first lines, one line)."""
  start = time.perf_counter()
  compiled, error = None, None
  try:
    with without_persistent_cache():
      compiled = build()
  except jax.errors.JaxRuntimeError as e:
    error = " ".join(str(e).split())[:400]
  return Executable(what, dtype, batch, dict(mesh.shape), compiled, error,
                    time.perf_counter() - start)


def int8_model(model: nnx.Module, input_shape: Sequence[int]) -> nnx.Module:
  """qwix PTQ of a float model; for an abstract model, its shapes."""
  return program_lib.transformed(
      model, lambda m: ptq(m, input_shape)[0], "int8 post-training "
      "quantization")


def serving(model: nnx.Module, input_shape: Sequence[int], target: Target,
            batch_sizes: Sequence[int], dtypes: Sequence[str] = DTYPES,
            spec: dict | None = None, metadata: dict | None = None,
            model_axis: int | None = None) -> list[Executable]:
  """One executable per dtype and batch bucket, each on `target.mesh(batch,
  model_axis)`. A model that is already quantized is served as it is
  (dtype 'int8'), whatever `dtypes` asks."""
  floating = program_lib.is_float_model(model)
  if not floating:
    dtypes = ("int8",)
  executables = []
  for dtype in dtypes:
    served = model
    if dtype == "int8" and floating:
      served = int8_model(model, input_shape)
    for batch in batch_sizes:
      mesh = target.mesh(batch, model_axis)
      executables.append(_compile(SERVE, dtype, batch, mesh, lambda: (
          CompiledModel(served, input_shape, [batch], mesh=mesh, spec=spec,
                        metadata=metadata, place=False,
                        dtype="float32" if dtype == "int8" else dtype)
          .executables[batch])))
  return executables


def _on(tree, sharding: NamedSharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train(spec: dict, train_config: ml_collections.ConfigDict, target: Target,
          input_dtype: str = "float32") -> Executable:
  """The train step of `spec`'s model under `train_config` (its optimizer,
  batch size and label smoothing), placed as the trainer places it."""
  place = Placement(target.devices)
  mesh = place.rows.mesh
  batch = int(train_config.batch_size)
  if batch % target.chips:
    return Executable(
        TRAIN, "float32", batch, dict(mesh.shape), None,
        f"config.train.batch_size {batch} does not divide over the "
        f"{target.chips} chips of {target.name} (the trainer splits each "
        "batch's rows over every chip)", 0.0)
  model = models.abstract_model(spec["name"], spec["args"])
  graphdef, params, rest = nnx.split(models.training_view(model), nnx.Param,
                                     ...)
  tx = make_optimizer(train_config)
  window = TrainMetrics()
  replicated, rows = place.replicated, place.rows
  shape = tuple(spec["args"]["input_shape"])
  loss = CrossEntropy(spec["args"]["num_classes"],
                      train_config.label_smoothing)
  return _compile(TRAIN, "float32", batch, mesh, lambda: train_step.lower(
      graphdef, tx, loss, window.graphdef, _on(params, replicated),
      _on(rest, replicated), _on(jax.eval_shape(tx.init, params), replicated),
      _on(window.state, replicated),
      jax.ShapeDtypeStruct((batch, *shape), jnp.dtype(input_dtype),
                           sharding=rows),
      jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)).compile())


def for_config(config: ml_collections.ConfigDict, target: Target,
               batch_sizes: Sequence[int], dtypes: Sequence[str] = DTYPES,
               model_axis: int | None = None) -> list[Executable]:
  """A config's model, untrained (its shapes: nothing is initialised and no
  data is read; the dataset's declaration gives the input shape): its
  serving executables, then its train step."""
  data = dataset_spec(config.data)
  spec = model_spec(config.model, data)
  model = models.abstract_model(spec["name"], spec["args"])
  return [*serving(model, spec["args"]["input_shape"], target, batch_sizes,
                   dtypes, spec=spec, model_axis=model_axis),
          train(spec, config.train, target, data.dtype)]


def as_served(model: nnx.Module, metadata: dict, target: Target,
              batch_sizes: Sequence[int]) -> list[Executable]:
  """A loaded checkpoint's serving executables as it is served on a TPU:
  in the dtype it recorded for 'tpu' (float32 unless a search for a slice
  chose otherwise), a quantized one as int8, with its recorded options."""
  spec = metadata["model"]
  dtype = options_lib.resolve(None, metadata, "tpu")["dtype"]
  return serving(model, spec["args"]["input_shape"], target, batch_sizes,
                 (dtype,), spec=spec, metadata=metadata)


def for_checkpoint(path, target: Target, batch_sizes: Sequence[int],
                   dtypes: Sequence[str] = DTYPES,
                   model_axis: int | None = None) -> list[Executable]:
  """A checkpoint's serving executables, with the serving options it
  recorded for a TPU, then the train step of the config it was trained with."""
  model, metadata = load_checkpoint(path)
  spec = metadata["model"]
  executables = serving(model, spec["args"]["input_shape"], target,
                        batch_sizes, dtypes, spec=spec, metadata=metadata,
                        model_axis=model_axis)
  if spec.get("quantization"):  # trained as the float model it wraps
    spec = {k: v for k, v in spec.items() if k != "quantization"}
  config = ml_collections.ConfigDict(metadata["config"])
  train_config = ml_collections.ConfigDict(metadata["train"])
  return [*executables, train(spec, train_config, target,
                              dataset_spec(config.data).dtype)]
