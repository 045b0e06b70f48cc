r"""python -m experiments.main --config=configs/compress_lm.py --workdir=workdirs/compress_lm

Drafts for speculative decoding, made from the `configs/lm.py:target`
language model by the compression pipeline (every stage shares the target's
recipe and data):

  teacher    the target itself (lm.py:target: 6 blocks, context 256)
  distilled  a third of its blocks (two), distilled from it: trained to
             match the target's next-character distribution (alpha 1,
             temperature 1: a draft is accepted where it agrees with it)
  scratch    the same two-block model trained from scratch (same steps and
             seed): what distillation adds to the acceptance rate
  distilled1 one block, distilled the same way: a cheaper draft that agrees
             less often
  pruned     the target with half its key/value heads and MLP units removed
             (structured pruning), fine-tuned

`python -m experiments.bench --checkpoints=<workdir>/teacher
--drafts=<workdir>/distilled,...` measures each draft's acceptance and
speedup. Variant `:tiny` runs the chain for a few steps (tests).
"""

from configs import lm
from rtjax.pipeline import stage_config


def get_config(arg: str | None = None):
  if arg not in (None, "tiny"):
    raise ValueError(f"unknown variant {arg!r} of configs/compress_lm.py; "
                     "known: tiny")
  config = lm.get_config("tiny" if arg else "target")
  args = config.model.args.to_dict()
  shallow = {"name": "decoder",
             "args": {**args, "depth": max(1, args["depth"] // 3)}}
  steps = config.train.num_steps
  stages = {
      "teacher": stage_config("train"),
      "distilled": stage_config("distill", parent="teacher", model=shallow,
                                alpha=1.0, temperature=1.0),
      "scratch": stage_config("train", model=shallow),
      "distilled1": stage_config(
          "distill", parent="teacher", alpha=1.0, temperature=1.0,
          model={"name": "decoder", "args": {**args, "depth": 1}}),
      "pruned": stage_config("structured_prune", parent="teacher",
                             keep_fraction=0.5, train={
                                 "num_steps": steps // 2,
                                 "warmup_steps": config.train.warmup_steps}),
  }
  config.stages = tuple(stages)
  config.stage = stages
  return config
