"""Training and inference views of one model (BatchNorm batch stats vs
running averages; a recurrence as a scan vs an unrolled loop).

`nnx.view` returns a new module graph that shares the original's arrays, so
both views can be split into graphdefs without copying any weights.
"""

from flax import nnx


def training_view(model: nnx.Module) -> nnx.Module:
  """Batch statistics, and recurrences as a scan (fast to compile and run;
  see rtjax.models.recurrent)."""
  return nnx.view(model, use_running_average=False, scan_steps=True,
                  raise_if_not_found=False)


def inference_view(model: nnx.Module) -> nnx.Module:
  return nnx.view(model, use_running_average=True, raise_if_not_found=False)
