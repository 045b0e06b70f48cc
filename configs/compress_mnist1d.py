r"""python -m experiments.main --config=configs/compress_mnist1d.py --workdir=workdirs/compress_mnist1d

Compression on MNIST-1D, where it has a price (on the digits every model
scores 99-100%). From the teacher `configs/mnist1d.py:best` (the paper's
CNN 64 channels wide, trained with random shifts of up to 4 steps); every
stage shares its recipe and data:

  teacher              the teacher
  structured50/25      structured pruning to 50% / 25% of its filters, fine-tuned
  sparse70/90          unstructured magnitude pruning to 70% / 90%, fine-tuned
  cnn25_distill_s{k}   the paper's CNN (25 channels) distilled from the teacher
  cnn25_scratch_s{k}   the same CNN from scratch: same recipe, steps and seed k
  cnn8_distill_s{k}    an 8-channel CNN distilled, and its
  cnn8_scratch_s{k}    from-scratch twin (seeds k = 0, 1, 2: the report pairs
                       each distilled student with its twin, mean ± std)
  gru                  a unidirectional 32-unit GRU read at its last step
                       (streamable) distilled from the CNN teacher
  gru_structured       the GRU pruned to half its units, fine-tuned
  gru_int8             the GRU as an int8 serving model (qwix PTQ)
  qat, int8            int8 quantization-aware fine-tuning of the teacher and
                       its int8 serving model

Variant `:tiny` runs the GRU chain for a few steps, the GRU trained from
scratch (tests).
"""

from configs import mnist1d
from rtjax.pipeline import stage_config

STUDENTS = {"cnn25": {"name": "cnn1d", "args": {"channels": (25, 25, 25)}},
            "cnn8": {"name": "cnn1d", "args": {"channels": (8, 8, 8)}}}
GRU = {"name": "gru", "args": {"hidden": (32,), "bidirectional": False,
                               "head": "last"}}
SEEDS = (0, 1, 2)


def get_config(arg: str | None = None):
  if arg not in (None, "tiny"):
    raise ValueError(f"unknown variant {arg!r} of configs/compress_mnist1d.py;"
                     " known: tiny")
  config = mnist1d.get_config("best")  # the teacher's model and recipe
  student = {"num_steps": 4000, "warmup_steps": 100}
  fine_tune = {"num_steps": 1500, "learning_rate": 3e-3, "warmup_steps": 50}
  stages = {
      "teacher": stage_config("train"),
      "structured50": stage_config("structured_prune", parent="teacher",
                                   keep_fraction=0.5, train=fine_tune),
      "structured25": stage_config("structured_prune", parent="teacher",
                                   keep_fraction=0.25, train=fine_tune),
      "sparse70": stage_config("prune", parent="teacher", target_sparsity=0.7,
                               train=fine_tune),
      "sparse90": stage_config("prune", parent="teacher", target_sparsity=0.9,
                               train=fine_tune),
  }
  for name, model in STUDENTS.items():
    for seed in SEEDS:
      recipe = {**student, "seed": seed}
      stages[f"{name}_distill_s{seed}"] = stage_config(
          "distill", parent="teacher", model=model, train=recipe)
      stages[f"{name}_scratch_s{seed}"] = stage_config(
          "train", model=model, train=recipe)
  stages.update(
      gru=stage_config("distill", parent="teacher", model=GRU,
                       train={"num_steps": 3000, "warmup_steps": 100}),
      gru_structured=stage_config("structured_prune", parent="gru",
                                  keep_fraction=0.5, train=fine_tune),
      gru_int8=stage_config("int8", parent="gru"),
      qat=stage_config("qat", parent="teacher", train={
          "num_steps": 500, "learning_rate": 3e-4, "warmup_steps": 20}),
      int8=stage_config("int8", parent="qat"),
  )
  if arg == "tiny":  # the GRU chain alone, the GRU trained from scratch
    stages = {"gru": stage_config("train", model=GRU),
              **{name: stages[name] for name in ("gru_structured", "gru_int8")}}
    config.train.update(num_steps=20, warmup_steps=2, eval_every=20,
                        log_every=10)
    stages["gru_structured"].train = {"num_steps": 20, "warmup_steps": 2}
    config.checkpoint.every_steps = 20
  config.stages = tuple(stages)
  config.stage = stages
  return config
