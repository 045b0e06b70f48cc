r"""python -m experiments.main --config=configs/lenet5.py --workdir=workdirs/lenet5

Classic CIFAR LeNet-5 (32x32x3) on digits32, the embedded digits resized to CIFAR shape.

Variant `configs/lenet5.py:cifar10` trains on CIFAR-10 python batches:
  python -m experiments.main --config=configs/lenet5.py:cifar10 \
      --config.data.dir=/path/to/cifar-10-batches-py --workdir=workdirs/lenet5_cifar
"""

from rtjax.config import base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.model.name = "lenet5"
  config.model.args.conv_channels = (6, 16)
  config.model.args.hidden = (120, 84)
  config.data.name = "digits32"
  config.data.max_shift = 3
  config.train.batch_size = 64
  config.train.num_steps = 1500
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 100
  if arg == "cifar10":
    config.data.name = "cifar10"
    config.data.max_shift = 4
    config.data.random_flip = True
    config.data.val_fraction = 0.1
    config.train.batch_size = 128
    config.train.num_steps = 20000
    config.train.eval_every = 2000
    config.checkpoint.every_steps = 2000
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/lenet5.py; "
                     "known: cifar10")
  return config
