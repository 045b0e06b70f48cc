"""`distill`: train `model` from scratch against the parent's softened
logits (Hinton et al.); the loss is rtjax.compress.distill's."""

from flax import nnx

from rtjax import models
from rtjax.compress.distill import ALPHA, TEMPERATURE, DistillationLoss
from rtjax.pipeline.registry import Context, register
from rtjax.pipeline.stages.common import parent
from rtjax.train import CrossEntropy, Stage
from rtjax.train.trainer import model_spec


def check(section, require) -> None:
  require(section.model.get("name") in models.model_names(), "model.name",
          "the student needs a known model; known: "
          f"{', '.join(models.model_names())}")
  require(0.0 <= section.alpha <= 1.0, "alpha",
          f"must be in [0, 1], got {section.alpha}")
  require(section.temperature > 0, "temperature",
          f"must be > 0, got {section.temperature}")


@register("distill", {"model": {}, "alpha": ALPHA, "temperature": TEMPERATURE},
          check)
def run(ctx: Context):
  s = ctx.section
  teacher, _ = parent(ctx)
  spec = model_spec(s.model, ctx.dataset)
  student = models.create_model(spec["name"], spec["args"], ctx.seed)
  graphdef, state = nnx.split(models.inference_view(teacher))
  loss = DistillationLoss(
      graphdef, s.alpha, s.temperature,
      CrossEntropy(ctx.dataset.num_classes, ctx.train_cfg.label_smoothing))
  done = {"alpha": s.alpha, "temperature": s.temperature,
          "teacher_flops": models.forward_flops(teacher,
                                                ctx.dataset.input_shape)}
  return ctx.train(Stage(student, spec, ctx.name, "distill",
                         str(ctx.parent_dir), loss=loss, loss_state=state,
                         done=done))
