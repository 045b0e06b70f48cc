"""`train`: plain training from scratch; `model` (name, args) overrides
config.model if set."""

from rtjax import models
from rtjax.pipeline.registry import Context, register
from rtjax.train import Stage
from rtjax.train.trainer import model_spec


@register("train", {"model": {}}, needs_parent=False)
def run(ctx: Context):
  spec = model_spec(ctx.section.model if ctx.section.model else ctx.config.model,
                  ctx.dataset)
  model = models.create_model(spec["name"], spec["args"], ctx.seed)
  return ctx.train(Stage(model, spec, ctx.name, "train"))
