"""`prune`: unstructured magnitude pruning on the Zhu & Gupta schedule, or
N:M sparsity, as an optax wrapper around the stage's optimizer."""

from rtjax.compress import pruning
from rtjax.pipeline.registry import Context, register
from rtjax.pipeline.stages.common import parent
from rtjax.train import Stage

METHODS = ("magnitude", "n_m")
SCOPES = ("global", "layer")


def check(section, require) -> None:
  require(section.method in METHODS, "method",
          f"unknown method {section.method!r}; known: {METHODS}")
  require(0.0 <= section.target_sparsity < 1.0, "target_sparsity",
          f"must be in [0, 1), got {section.target_sparsity}")
  require(section.scope in SCOPES, "scope",
          f"unknown scope {section.scope!r}; known: {SCOPES}")
  require(0 < section.n < section.m, "n",
          f"N:M needs 0 < n < m, got {section.n}:{section.m}")
  require(section.update_every > 0, "update_every",
          f"must be > 0, got {section.update_every}")


@register("prune", {"method": "magnitude", "target_sparsity": 0.8,
                    "initial_sparsity": 0.0, "begin_step": 0, "end_step": 0,
                    "update_every": 50, "scope": "global",
                    "include": "kernel$", "exclude": "", "n": 2, "m": 4},
          check)
def run(ctx: Context):
  s = ctx.section
  model, metadata = parent(ctx)
  end = s.end_step or int(0.75 * ctx.train_cfg.num_steps)
  prunable = lambda p: pruning.prunable_tree(p, s.include, s.exclude)
  if s.method == "magnitude":
    mask_fn = lambda p, pr, step: pruning.magnitude_masks(
        p, pr, pruning.polynomial_sparsity(
            step, s.initial_sparsity, s.target_sparsity, s.begin_step, end),
        s.scope)
    begin, every = s.begin_step, s.update_every
  else:  # N:M: one mask at the first step, kept from then on
    mask_fn = lambda p, pr, step: pruning.n_m_masks(p, pr, s.n, s.m)
    begin, every, end = 1, 1, 1
  done = {"method": s.method, "target_sparsity": s.target_sparsity,
          "scope": s.scope, "exclude": s.exclude, "n_m": [s.n, s.m],
          "schedule_steps": [begin, end, every]}
  return ctx.train(Stage(
      model, metadata["model"], ctx.name, "prune", str(ctx.parent_dir),
      wrap_optimizer=lambda tx: pruning.pruned(tx, prunable, mask_fn, every,
                                               begin, end),
      done=done))
