"""`optimize`, a stage type, so a compression config can end with the
search: its parent is the model to optimize, its stage directory the
search's workdir, and its own checkpoint (`<workdir>/<stage>/checkpoints`)
the chosen model, serving options recorded.

Registered here, at the top layer, into rtjax.pipeline's registry (an
import downward); nothing below imports it. A config that uses the type
imports rtjax.optimize before calling stage_config("optimize", ...), which
registers it in the process that loads the config, i.e. the one that runs
the pipeline.
"""

from __future__ import annotations

import dataclasses

from rtjax.checkpoint import load_checkpoint
from rtjax.optimize.search import run_search
from rtjax.optimize.settings import Settings
from rtjax.pipeline.registry import Context, register
from rtjax.train import TrainResult

# Every search setting (rtjax.optimize.settings) is a key of the stage's
# section, with its default.
DEFAULTS = dataclasses.asdict(Settings())
TUPLES = {f.name for f in dataclasses.fields(Settings)
          if isinstance(DEFAULTS[f.name], tuple)}


def settings_of(section) -> Settings:
  return Settings(**{k: tuple(section[k]) if k in TUPLES else section[k]
                     for k in DEFAULTS})


def check(section, require) -> None:
  for name, problem in settings_of(section).problems():
    require(False, name, problem)


@register("optimize", DEFAULTS, check)
def run(ctx: Context) -> TrainResult:
  run_search(ctx.parent_dir, ctx.stage_dir, settings_of(ctx.section),
             best_dir=ctx.stage_dir)
  _, metadata = load_checkpoint(ctx.stage_dir)
  return TrainResult(step=metadata["step"], preempted=False,
                     metrics=metadata["metrics"],
                     checkpoint_dir=ctx.stage_dir / "checkpoints")
