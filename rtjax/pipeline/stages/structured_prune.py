"""`structured_prune`: remove whole units (filters, dense units, heads) and
fine-tune the smaller model of the same family."""

from rtjax import models
from rtjax.compress import structured
from rtjax.pipeline.registry import Context, register
from rtjax.pipeline.stages.common import parent
from rtjax.train import Stage


def check(section, require) -> None:
  require(0.0 < section.keep_fraction <= 1.0, "keep_fraction",
          f"must be in (0, 1], got {section.keep_fraction}")
  require(section.round_to >= 1, "round_to",
          f"must be >= 1, got {section.round_to}")
  require(section.criterion in structured.CRITERIA, "criterion",
          f"unknown criterion {section.criterion!r}; known: "
          f"{', '.join(structured.CRITERIA)}")


@register("structured_prune", {"keep_fraction": 0.5, "criterion": "l2",
                               "round_to": 1, "groups": ".*"}, check)
def run(ctx: Context):
  s = ctx.section
  model, metadata = parent(ctx)
  spec = metadata["model"]
  smaller, args, summary = structured.shrink(
      model, spec["name"], spec["args"], s.keep_fraction, s.criterion,
      s.round_to, s.groups)
  shape = ctx.dataset.input_shape
  done = {"keep_fraction": s.keep_fraction, "criterion": s.criterion,
          "round_to": s.round_to, "groups": summary,
          "flops_before": models.forward_flops(model, shape),
          "flops_after": models.forward_flops(smaller, shape)}
  return ctx.train(Stage(smaller, {"name": spec["name"], "args": args},
                         ctx.name, "structured_prune", str(ctx.parent_dir),
                         done=done))
