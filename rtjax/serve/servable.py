"""What the server needs of a model: a function on exact bucket batches, its
buckets and its tensor signature. A checkpoint becomes one through
CompiledModel; a test can hand the server any other function."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
from etils import epath

from rtjax.infer import CompiledModel
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
                    batch_sizes: Sequence[int], **serving) -> Servable:
  """The checkpoint AOT-compiled for `batch_sizes` (serving options as
  CompiledModel takes them); its output shape read from one call."""
  model = CompiledModel.from_checkpoint(path, batch_sizes=batch_sizes,
                                        **serving)
  out = model(np.zeros((model.batch_sizes[0], *model.input_shape), np.float32))
  signature = Signature("images", model.input_shape, "FP32", "logits",
                        tuple(out.shape[1:]), "FP32")
  return Servable(name, model, model.batch_sizes, signature,
                  platform="rtjax_xla")
