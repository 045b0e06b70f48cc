"""Exported serving artifacts: a `jax.export` (StableHLO) module with the
weights inside, which any process with jax runs without rtjax's model code."""

from __future__ import annotations

import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rtjax.infer.fold import fold_batchnorm


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
  spec = jax.ShapeDtypeStruct((*batch, *input_shape), jnp.float32)
  exported = jax.export.export(jax.jit(serve))(spec)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(exported.serialize())
  manifest = {"format": "jax_export", "input_shape": list(input_shape),
              "input_dtype": "float32", "batch_dim": "symbolic",
              "metadata": metadata or {}}
  path.with_name(path.name + ".json").write_text(json.dumps(manifest, indent=1))
  return path


def load_exported(path: epath.PathLike) -> Callable[[np.ndarray], jax.Array]:
  """The exported function: images (any batch) -> logits."""
  exported = jax.export.deserialize(bytearray(epath.Path(path).read_bytes()))
  return exported.call


def export_onnx(model: nnx.Module, input_shape: Sequence[int],
                path: epath.PathLike, metadata: dict | None = None
                ) -> epath.Path:
  """ONNX (float models, BatchNorm folded, batch dimension 'B') through
  jax2onnx, checked with onnx.checker; needs the `onnx` extra."""
  try:
    import onnx
    from jax2onnx import to_onnx
  except ImportError as e:
    raise ImportError("ONNX export needs jax2onnx and onnx: pip install "
                      "'rtjax[onnx]'") from e
  if (metadata or {}).get("model", {}).get("quantization"):
    raise ValueError("ONNX export takes float checkpoints; this one is "
                     "quantized (export its float parent, or use jax_export)")
  proto = to_onnx(fold_batchnorm(model), [("B", *input_shape)])
  onnx.checker.check_model(proto)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(proto.SerializeToString())
  return path
