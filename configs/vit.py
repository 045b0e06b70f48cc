r"""python -m experiments.main --config=configs/vit.py --workdir=workdirs/vit

ViT-style Transformer classifier on the embedded digits (8x8x1, 2x2 patches).
"""

from rtjax.config import base_config


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/vit.py has no variant {arg!r}")
  config = base_config()
  config.model.name = "vit"
  config.model.args.patch_size = 2
  config.model.args.embed_dim = 64
  config.model.args.depth = 4
  config.model.args.num_heads = 4
  config.model.args.head_dim = 16
  config.model.args.mlp_dim = 128
  config.data.name = "digits"
  config.train.batch_size = 64
  config.train.num_steps = 4000
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 0.1
  config.train.label_smoothing = 0.1
  config.train.warmup_steps = 100
  config.train.grad_clip_norm = 1.0
  return config
