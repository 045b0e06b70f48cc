r"""python -m experiments.main --config=configs/lm.py:cpu --workdir=workdirs/lm/cpu

Character language models on Shakespeare's plays (rtjax.data.shakespeare:
split by play, 78 characters), decoder family (rtjax.models.decoder):
next-character prediction, reported as loss in nats per character, bits
per character and next-character accuracy.

Variants (`:name`):
  nanogpt_baby  nanoGPT's CPU "baby" model in this family: 4 blocks of 4
                heads, 128 wide, context 64, batches of 12, AdamW at 1e-3
                for 2,000 steps (nanoGPT's LayerNorm and learned positions
                are RMSNorm and RoPE here): a reference point
  cpu           the headline model for this 2-core CPU (GQA, SwiGLU),
                trained in at most 5 minutes here
  target        the best model trained in at most 15 minutes here: cpu's
                blocks six deep, context 256, batches of 8 (wider models
                saw too few tokens in that time; lm_shakespeare.md's
                notes): the model a draft from the compression pipeline
                speeds up
  tiny          a few steps of a two-block model (tests)
"""

from rtjax.config import base_config

MODELS = {
    "nanogpt_baby": {"embed_dim": 128, "depth": 4, "num_heads": 4,
                     "head_dim": 32, "mlp_dim": 512},
    "cpu": {"embed_dim": 128, "depth": 4, "num_heads": 4, "num_kv_heads": 2,
            "head_dim": 32, "mlp_dim": 384, "gated": True},
    "target": {"embed_dim": 128, "depth": 6, "num_heads": 4,
               "num_kv_heads": 2, "head_dim": 32, "mlp_dim": 384,
               "gated": True},
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "head_dim": 16,
             "mlp_dim": 64},
}
# (context, batch size, steps, peak learning rate, warmup steps)
RECIPES = {
    "nanogpt_baby": (64, 12, 2000, 1e-3, 100),
    "cpu": (128, 16, 1400, 2e-3, 100),
    "target": (256, 8, 2000, 2e-3, 100),
    "tiny": (32, 16, 30, 3e-3, 5),
}


def get_config(arg: str | None = None):
  variant = arg or "cpu"
  if variant not in MODELS:
    raise ValueError(f"unknown variant {variant!r} of configs/lm.py; "
                     f"known: {', '.join(MODELS)}")
  context, batch, steps, learning_rate, warmup = RECIPES[variant]
  config = base_config()
  config.model.name = "decoder"
  config.model.args.update(MODELS[variant])
  config.data.name = "shakespeare"
  config.data.context = context
  config.data.max_shift = 0
  config.train.batch_size = batch
  config.train.num_steps = steps
  config.train.learning_rate = learning_rate
  config.train.warmup_steps = warmup
  config.train.weight_decay = 0.1
  config.train.grad_clip_norm = 1.0
  config.train.log_every = max(1, steps // 20)
  config.train.eval_every = steps
  config.train.eval_batch_size = 64
  config.checkpoint.every_steps = steps
  return config
