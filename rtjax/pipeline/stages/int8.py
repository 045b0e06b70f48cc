"""`int8`: the serving model of a float or QAT parent (qwix PtqProvider +
quantize_params: int8 values and scales); evaluated, not trained."""

import itertools

from rtjax.checkpoint import save_complete_step
from rtjax.compress import quantize
from rtjax.data import eval_batches
from rtjax.models import quantized
from rtjax.pipeline.registry import Context, register
from rtjax.pipeline.stages.common import float_copy, parent
from rtjax.train import Stage, TrainResult
from rtjax.train.evaluate import evaluate
from rtjax.train.trainer import model_size, stage_metadata


def check(section, require) -> None:
  require(section.scheme in ("", *quantized.SCHEMES), "scheme",
          f"unknown scheme {section.scheme!r}; known: "
          f"{', '.join(quantized.SCHEMES)} ('' inherits the parent's)")
  require(section.calibration_batches > 0, "calibration_batches",
          f"must be > 0, got {section.calibration_batches}")


@register("int8", {"scheme": "", "module_path": ".*",
                   "static_activations": False, "calibration_batches": 8},
          check)
def run(ctx: Context) -> TrainResult:
  s, dataset = ctx.section, ctx.dataset
  model, metadata = parent(ctx)
  spec = {k: v for k, v in metadata["model"].items() if k != "quantization"}
  inherited = (metadata["model"].get("quantization") or {}).get("scheme")
  batch = ctx.config.train.eval_batch_size
  calibration = None
  if s.static_activations:
    calibration = [images for images, _, _ in itertools.islice(
        eval_batches(dataset.train, batch), s.calibration_batches)]
  served, qspec = quantize.ptq(float_copy(model, spec), dataset.input_shape,
                               s.scheme or inherited or "w8a8", s.module_path,
                               calibration)
  metrics = {"val": evaluate(served, dataset.val, batch),
             "test": evaluate(served, dataset.test, batch)}
  stage = Stage(served, {**spec, "quantization": qspec}, ctx.name, "int8",
                str(ctx.parent_dir), done={"quantization": qspec,
                                           "calibrated": calibration is not None})
  directory = save_complete_step(served, stage_metadata(
      ctx.config, ctx.train_cfg, stage, dataset, 0, metrics,
      model_size(served, dataset.input_shape), complete=True), ctx.stage_dir)
  return TrainResult(step=0, preempted=False, metrics=metrics,
                     checkpoint_dir=directory)
