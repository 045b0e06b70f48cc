r"""python -m experiments.main --config=configs/compress.py --workdir=workdirs/compress

Compression pipeline on the embedded digits, starting from the default CNN:

  teacher     train the default ResNet-style CNN
  structured  structured pruning of the teacher to half its filters, fine-tuned
  sparse      unstructured magnitude pruning of the teacher to 80% (Zhu & Gupta)
  student     a 4x cheaper CNN distilled from the teacher
  scratch     the same student trained from scratch (same steps, same seed)
  qat         int8 quantization-aware fine-tuning of the teacher (qwix)
  int8        int8 serving model (int8 weights + scales) from `qat`

Each stage writes <workdir>/<stage>/checkpoints and report.json. Variant
`configs/compress.py:tiny` runs every stage for a few steps (tests).
"""

from configs import default
from rtjax.pipeline import stage_config

STUDENT = {"name": "resnet",
           "args": {"stem_width": 16, "stage_widths": (16, 28),
                    "blocks_per_stage": (1, 1), "stage_strides": (1, 2)}}


def get_config(arg: str | None = None):
  config = default.get_config("tiny" if arg == "tiny" else None)
  fine_tune = {"num_steps": 1000, "learning_rate": 1e-3, "warmup_steps": 50}
  config.stages = ("teacher", "structured", "sparse", "student", "scratch",
                   "qat", "int8")
  config.stage.teacher = stage_config("train")
  config.stage.structured = stage_config(
      "structured_prune", parent="teacher", keep_fraction=0.5,
      criterion="bn_scale", train=fine_tune)
  config.stage.sparse = stage_config(
      "prune", parent="teacher", target_sparsity=0.8, exclude="stem|head",
      train={**fine_tune, "num_steps": 1500})
  config.stage.student = stage_config("distill", parent="teacher",
                                      model=STUDENT, alpha=0.7,
                                      temperature=4.0)
  config.stage.scratch = stage_config("train", model=STUDENT)
  config.stage.qat = stage_config(
      "qat", parent="teacher", scheme="w8a8",
      train={"num_steps": 500, "learning_rate": 3e-4, "warmup_steps": 20})
  config.stage.int8 = stage_config("int8", parent="qat")
  if arg == "tiny":
    short = {"num_steps": 30, "warmup_steps": 5, "learning_rate": 3e-3}
    for name in ("structured", "sparse", "qat"):
      config.stage[name].train = short
    config.stage.sparse.update_every = 5
    for name in ("student", "scratch"):
      config.stage[name].train = {"num_steps": 60, "warmup_steps": 5}
    config.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/compress.py; "
                     "known: tiny")
  return config
