"""`qat`: quantization-aware fine-tuning of the parent with qwix
(QtProvider: fake-quantized forward, straight-through gradients)."""

from rtjax.models import quantized
from rtjax.pipeline.registry import Context, register
from rtjax.pipeline.stages.common import float_copy, parent
from rtjax.train import Stage


def check(section, require) -> None:
  require(section.scheme in quantized.SCHEMES, "scheme",
          f"unknown scheme {section.scheme!r}; known: "
          f"{', '.join(quantized.SCHEMES)}")


@register("qat", {"scheme": "w8a8", "module_path": ".*"}, check)
def run(ctx: Context):
  model, metadata = parent(ctx)
  spec = metadata["model"]
  qspec = quantized.quantization_spec(ctx.section.scheme,
                                      ctx.section.module_path, mode="qat")
  model = quantized.qat_model(float_copy(model, spec), qspec,
                              ctx.dataset.input_shape)
  return ctx.train(Stage(model, {**spec, "quantization": qspec}, ctx.name,
                         "qat", str(ctx.parent_dir),
                         done={"quantization": qspec}))
