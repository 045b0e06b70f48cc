"""Exported serving artifacts: a `jax.export` (StableHLO) module with the
weights inside, which any process with jax runs without rtjax's model code;
and ONNX graphs (rtjax's serving graph, or the model's natural one for peers)."""

from __future__ import annotations

import json
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rtjax.infer.fold import fold_batchnorm
from rtjax.models.registry import input_dtype


def export_serving(model: nnx.Module, input_shape: Sequence[int],
                   path: epath.PathLike, metadata: dict | None = None
                   ) -> epath.Path:
  """Writes `path` (serialized jax.export, batch dimension symbolic) and
  `path.json` (input shape, dtype, the checkpoint's metadata)."""
  graphdef, state = nnx.split(fold_batchnorm(model))
  state = jax.device_get(state)

  def serve(images):
    return nnx.merge(graphdef, state)(images)  # weights become constants

  batch = jax.export.symbolic_shape("batch")
  dtype = jnp.dtype(input_dtype(model))
  spec = jax.ShapeDtypeStruct((*batch, *input_shape), dtype)
  exported = jax.export.export(jax.jit(serve))(spec)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(exported.serialize())
  manifest = {"format": "jax_export", "input_shape": list(input_shape),
              "input_dtype": dtype.name, "batch_dim": "symbolic",
              "metadata": metadata or {}}
  path.with_name(path.name + ".json").write_text(json.dumps(manifest, indent=1))
  return path


def load_exported(path: epath.PathLike) -> Callable[[np.ndarray], jax.Array]:
  """The exported function: images (any batch) -> logits."""
  exported = jax.export.deserialize(bytearray(epath.Path(path).read_bytes()))
  return exported.call


def onnx_proto(model: nnx.Module, input_shape: Sequence[int],
               batch: int | str = "B", natural: bool = False,
               channels_first: bool = False):
  """The ONNX ModelProto of a float model through jax2onnx (the `onnx`
  extra); `batch`: a fixed batch size, or a name for a symbolic one.

  natural=False: rtjax's serving graph (BatchNorm folded, the model's own
  XLA-minded ops). natural=True: the model as another runtime would get it
  from its training-time definition: BatchNorm kept (the runtime fuses it),
  strided-slice max pools as MaxPool (rtjax.infer.natural).
  channels_first: a rank-4 image input taken as NCHW, the layout ONNX
  convolutions use, so no transpose of the input remains in the graph."""
  try:
    from jax2onnx import to_onnx
  except ImportError as e:
    raise ImportError("ONNX export needs jax2onnx and onnx: pip install "
                      "'rtjax[onnx]'") from e
  from rtjax.infer.natural import natural as natural_fn  # jax2onnx users only
  from rtjax.models import inference_view
  if natural:
    view = inference_view(model)
    fn = natural_fn(lambda x: view(x))
  else:
    fn = fold_batchnorm(model)
  shape = tuple(input_shape)
  if channels_first and len(shape) == 3:
    height, width, channels = shape
    shape, nhwc = (channels, height, width), fn
    fn = lambda x: nhwc(jnp.transpose(x, (0, 2, 3, 1)))
  root = logging.getLogger()  # jax2onnx logs each export at INFO there
  level = root.level
  root.setLevel(max(level, logging.WARNING))
  try:
    return to_onnx(fn, [(batch, *shape)])
  finally:
    root.setLevel(level)


def export_onnx(model: nnx.Module, input_shape: Sequence[int],
                path: epath.PathLike, metadata: dict | None = None
                ) -> epath.Path:
  """ONNX (float models, BatchNorm folded, batch dimension 'B') through
  jax2onnx, checked with onnx.checker; needs the `onnx` extra."""
  if (metadata or {}).get("model", {}).get("quantization"):
    raise ValueError("ONNX export takes float checkpoints; this one is "
                     "quantized (export its float parent, or use jax_export)")
  proto = onnx_proto(model, input_shape)
  import onnx  # installed with jax2onnx (the `onnx` extra)
  onnx.checker.check_model(proto)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(proto.SerializeToString())
  return path
