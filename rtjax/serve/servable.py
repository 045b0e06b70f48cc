"""What the server needs of a model: a function on exact bucket batches, its
buckets and its tensor signature. A checkpoint becomes one through
CompiledModel (a decoder language model's becomes a Generator, its decoding
engine, instead); a test can hand the server any other function."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from etils import epath

from rtjax.checkpoint import load_checkpoint
from rtjax.infer import CompiledModel
from rtjax.infer.engine import Engine, is_decoder
from rtjax.serve.generating import Generator
from rtjax.serve.protocol import Signature


@dataclasses.dataclass
class Servable:
  name: str
  run: Callable[[np.ndarray], np.ndarray]  # (bucket, *input) -> (bucket, *output)
  buckets: Sequence[int]
  signature: Signature
  version: str = "1"
  platform: str = "rtjax"


def from_checkpoint(path: epath.PathLike, name: str,
                    batch_sizes: Sequence[int], slots: int = 8,
                    kv_cache: str | None = None,
                    **serving) -> Servable | Generator:
  """The checkpoint AOT-compiled for `batch_sizes` (serving options as
  CompiledModel takes them); its output shape read from one call. A
  decoder becomes an engine of `slots` slots (its `kv_cache` option)."""
  model, metadata = load_checkpoint(path)
  if is_decoder(model):
    return Generator(name, Engine(
        model, metadata["model"]["args"]["input_shape"][0], metadata,
        slots=slots, dtype=serving.get("dtype"),
        dot_kernels=serving.get("dot_kernels"), kv_cache=kv_cache))
  model = CompiledModel(model, metadata["model"]["args"]["input_shape"],
                        spec=metadata["model"], metadata=metadata,
                        batch_sizes=batch_sizes, **serving)
  out = model(np.zeros((model.batch_sizes[0], *model.input_shape), np.float32))
  signature = Signature("images", model.input_shape, "FP32", "logits",
                        tuple(out.shape[1:]), "FP32")
  return Servable(name, model, model.batch_sizes, signature,
                  platform="rtjax_xla")
