"""Training and inference views of one model (BatchNorm batch stats vs running averages).

`nnx.view` returns a new module graph that shares the original's arrays, so
both views can be split into graphdefs without copying any weights.
"""

from flax import nnx


def training_view(model: nnx.Module) -> nnx.Module:
  return nnx.view(model, use_running_average=False, raise_if_not_found=False)


def inference_view(model: nnx.Module) -> nnx.Module:
  return nnx.view(model, use_running_average=True, raise_if_not_found=False)
