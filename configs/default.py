r"""python -m experiments.main --config=configs/default.py --workdir=workdirs/default

Default experiment: a small ResNet-style CNN on the embedded digits (8x8x1).

Variants: `configs/default.py:tiny` is a seconds-long run for smoke tests;
`configs/default.py:tpu` sizes batches for a v5e-8 (see experiments/launch.py).
"""

from rtjax.config import base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.model.name = "resnet"
  config.model.args.stem_width = 32
  config.model.args.stage_widths = (32, 64)
  config.model.args.blocks_per_stage = (1, 1)
  config.model.args.stage_strides = (1, 2)
  config.data.name = "digits"
  config.train.batch_size = 64
  config.train.num_steps = 1500
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 100
  if arg == "tiny":
    config.model.args.stem_width = 16
    config.model.args.stage_widths = (16, 32)
    config.train.learning_rate = 1e-2
    config.train.num_steps = 150
    config.train.warmup_steps = 10
    config.train.log_every = 10
    config.train.eval_every = 50
    config.checkpoint.every_steps = 50
  elif arg == "tpu":
    # A v5e-8 (8 chips, one host) or any slice whose device count divides 256.
    config.train.batch_size = 256
    config.train.eval_batch_size = 512
    config.train.num_steps = 600
    config.train.learning_rate = 6e-3
    config.train.warmup_steps = 50
    config.checkpoint.every_steps = 200
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/default.py; "
                     "known: tiny, tpu")
  return config
