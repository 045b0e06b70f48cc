r"""python -m experiments.main --config=configs/mnist1d.py:cnn --workdir=workdirs/mnist1d_cnn

MNIST-1D (Greydanus 2020): 40-step 1D signals, 10 classes, generated locally
by the `mnist1d` package (5,000 examples: 3,600 train / 400 val / 1,000 test
here; the paper trained on all 4,000). A benchmark on which model families
and compressions differ, unlike the saturated digits.

Variants (`:name`), each the paper's model unless said otherwise:
  logistic     a linear layer over the 40 values (paper: 32%)
  mlp          two hidden layers of 100, residual (paper: 68%)
  cnn          three conv1d layers of 25 channels, kernel 5/3/3, stride 2 (paper: 94%)
  gru          bidirectional GRU of 6 units, linear over all 40 outputs (paper: 91%)
  gru_stream   a unidirectional 2-layer GRU read at its last step: streamable
  lstm         the gru variant with LSTM cells
  transformer  a 2-block Transformer over the 40 steps, learned positions
  best         the cnn with random shifts of up to 4 steps and weight decay
               1e-2: the best validation accuracy of the settings tried
               (learning rate 3e-3, weight decay, shifts of 2 and 4)
  tiny         a few steps of the cnn variant (tests)
The paper's recipe: Adam, learning rate 1e-2, batches of 100, 6,000 steps.
"""

from rtjax.config import base_config

MODELS = {
    "logistic": ("mlp", {"hidden": ()}),
    "mlp": ("mlp", {"hidden": (100, 100)}),
    "cnn": ("cnn1d", {}),
    "gru": ("gru", {"hidden": (6,), "bidirectional": True, "head": "all"}),
    "gru_stream": ("gru", {"hidden": (32, 32), "bidirectional": False,
                           "head": "last"}),
    "lstm": ("lstm", {"hidden": (6,), "bidirectional": True, "head": "all"}),
    "transformer": ("transformer1d", {}),
}


def get_config(arg: str | None = None):
  variant = arg or "cnn"
  if variant not in (*MODELS, "best", "tiny"):
    raise ValueError(f"unknown variant {variant!r} of configs/mnist1d.py; "
                     f"known: {', '.join((*MODELS, 'best', 'tiny'))}")
  config = base_config()
  config.data.name = "mnist1d"
  config.data.max_shift = 0  # the paper trains without augmentation
  config.data.val_fraction = 0.1
  name, args = MODELS["cnn" if variant in ("tiny", "best") else variant]
  config.model.name = name
  config.model.args.update(args)
  config.train.batch_size = 100
  config.train.num_steps = 6000
  config.train.learning_rate = 1e-2
  config.train.weight_decay = 0.0
  config.train.warmup_steps = 100
  config.train.eval_every = 1000
  config.train.log_every = 200
  config.checkpoint.every_steps = 1000
  if variant == "best":
    config.data.max_shift = 4
    config.train.weight_decay = 1e-2
  if variant == "tiny":
    config.train.num_steps = 60
    config.train.warmup_steps = 5
    config.train.eval_every = 30
    config.train.log_every = 10
    config.checkpoint.every_steps = 30
  return config
