"""`int8`: the serving model of a float or QAT parent (qwix PtqProvider +
quantize_params: int8 values and scales); evaluated, not trained."""

from flax import nnx

from rtjax.checkpoint import RunCheckpoints
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
  qspec = quantized.quantization_spec(s.scheme or inherited or "w8a8",
                                      s.module_path, s.static_activations,
                                      mode="ptq")
  plain = float_copy(model, spec)
  stats = None
  batch = ctx.config.train.eval_batch_size
  if s.static_activations:
    batches = [images for images, _, _ in eval_batches(dataset.train, batch)]
    stats = quantize.calibrate(plain, qspec, dataset.input_shape,
                               batches[:s.calibration_batches])
  served = quantize.int8_model(plain, qspec, dataset.input_shape, stats)
  metrics = {"val": evaluate(served, dataset.val, batch),
             "test": evaluate(served, dataset.test, batch)}
  stage = Stage(served, {**spec, "quantization": qspec}, ctx.name, "int8",
                str(ctx.parent_dir), done={"quantization": qspec,
                                           "calibrated": bool(stats)})
  checkpoints = RunCheckpoints(ctx.stage_dir / "checkpoints", 1)
  checkpoints.save(0, nnx.state(served), None, stage_metadata(
      ctx.config, ctx.train_cfg, stage, dataset, 0, metrics,
      model_size(served, dataset.input_shape), complete=True),
                   host_arrays=True)
  checkpoints.wait()
  checkpoints.close()
  return TrainResult(step=0, preempted=False, metrics=metrics,
                     checkpoint_dir=checkpoints.directory)
