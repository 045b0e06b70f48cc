"""What several stage types share: their parent's model, its float form."""

from __future__ import annotations

from flax import nnx

from rtjax import models
from rtjax.checkpoint import load_checkpoint
from rtjax.pipeline.registry import Context


def parent(ctx: Context) -> tuple[nnx.Module, dict]:
  """The parent stage's model and its checkpoint metadata."""
  return load_checkpoint(ctx.parent_dir)


def float_copy(model: nnx.Module, spec: dict) -> nnx.Module:
  """The plain float model under a (possibly QAT-wrapped) one."""
  plain = models.create_model(spec["name"], spec["args"])
  state = nnx.state(plain)
  nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
  nnx.update(plain, state)
  return plain
