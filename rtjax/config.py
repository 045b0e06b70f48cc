"""The experiment config contract: every key and its default, and validation
that runs before anything is compiled (stage sections: rtjax.pipeline).

Config files start from `base_config()` and change values; a key that is not
here (a typo, a stale option) is an error that names it.
"""

from __future__ import annotations

import jax
import ml_collections

from rtjax.data import check_dataset, dataset_spec, shakespeare
from rtjax.errors import ConfigError
from rtjax.models import DATASET_ARGS, model_arg_names, model_names

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Compression pipeline: stage names in order, each described in
  # c.stage.<name> (rtjax.pipeline validates and runs them). Empty: train only.
  c.stages = ()
  c.stage = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet"
  # Constructor arguments of the family (checked against its signature);
  # num_classes and input_shape come from the dataset.
  c.model.args = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.dir = ""  # cifar10: local or gs:// directory of the python batches
  c.data.val_fraction = 0.1
  # digits only (checked by rtjax.data.digits); cifar10 (test_batch) and
  # mnist1d (the generator's test part) have their own test split.
  c.data.test_fraction = 0.2
  # Random translation, pixels (images) or time steps (sequences); the flip
  # is of the width (images) or time (sequences).
  c.data.max_shift = 1
  c.data.random_flip = False
  # mnist1d: the generator's own arguments (mnist1d.data.get_dataset_args,
  # checked by rtjax.data.mnist1d); these defaults give the package's default
  # dataset, 4,000 train-part and 1,000 test examples (train part 80%; val is
  # carved from it by seed).
  c.data.mnist1d = ml_collections.ConfigDict()
  c.data.mnist1d.num_samples = 5000  # num_samples // 10 per class
  c.data.mnist1d.seed = 42  # the generator's, not the split seed (c.seed)
  # shakespeare: input characters per example (its split is by play; see
  # rtjax.data.shakespeare).
  c.data.context = shakespeare.CONTEXT

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.num_steps = 1000
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-3
  c.train.momentum = 0.9  # sgd
  c.train.nesterov = True  # sgd
  c.train.weight_decay = 1e-4
  c.train.schedule = "cosine"
  c.train.warmup_steps = 50
  c.train.grad_clip_norm = 0.0  # 0 disables clipping
  # Model initialization and batch order; -1 takes config.seed (which also
  # draws the data split). A stage sets it to repeat itself over seeds on
  # one split, e.g. --config.stage.scratch.train.seed=1.
  c.train.seed = -1
  c.train.label_smoothing = 0.0
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batch_size = 512

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 250
  c.checkpoint.max_to_keep = 2
  return c


def init_seed(config, train_cfg) -> int:
  """The seed of model initialization and batch order for a run or stage."""
  return train_cfg.seed if train_cfg.seed >= 0 else config.seed


def _unknown_keys(config, schema, prefix="") -> list[str]:
  unknown = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    if key not in schema:
      unknown.append(path)
    elif path in ("model.args", "stage"):
      continue  # checked against the family's constructor / stage types
    elif isinstance(value, ml_collections.ConfigDict):
      unknown += _unknown_keys(value, schema[key], path + ".")
  return unknown


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{key}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key; cheap (no data is read),
  runs before compiling."""
  _check_keys(config)
  _check_model(config.model)
  _check_data(config.data)
  _check_train_sizes(config.train)
  _check_optimizer(config.train)
  _check_checkpoint(config.checkpoint)


def _check_keys(config) -> None:
  unknown = _unknown_keys(config, base_config())
  if unknown:
    raise ConfigError(
        f"unknown config key(s): {', '.join(unknown)}. Known keys are those "
        "of rtjax.config.base_config(); check the spelling.")


def _check_model(model) -> None:
  """A known family, and only constructor arguments it takes from a config."""
  _require(model.name in model_names(), "model.name",
           f"unknown model {model.name!r}; known: {', '.join(model_names())}")
  allowed = model_arg_names(model.name)
  for arg in model.args:
    if arg in DATASET_ARGS:
      raise ConfigError(f"config.model.args.{arg} is set from the dataset; "
                        "remove it")
    _require(arg in allowed, f"model.args.{arg}",
             f"not an argument of {model.name!r}; its arguments are "
             f"{', '.join(allowed)}")


def _check_data(data) -> None:
  """A registered dataset (rtjax.data: an unknown name lists them), the keys
  every dataset reads, then the dataset's own check of its keys."""
  dataset_spec(data)
  _require(0.0 <= data.val_fraction < 1.0, "data.val_fraction",
           f"must be in [0, 1), got {data.val_fraction}")
  _require(data.max_shift >= 0, "data.max_shift",
           f"must be >= 0, got {data.max_shift}")
  check_dataset(data, lambda ok, key, message: _require(
      ok, f"data.{key}", message))


def _check_train_sizes(train) -> None:
  """Steps and batch sizes, the batches divisible over the devices."""
  _require(train.num_steps > 0, "train.num_steps",
           f"must be > 0, got {train.num_steps}")
  _require(train.batch_size > 0, "train.batch_size",
           f"must be > 0, got {train.batch_size}")
  devices = jax.device_count()
  _require(train.batch_size % devices == 0, "train.batch_size",
           f"{train.batch_size} is not divisible by the {devices} devices; "
           f"use a multiple of {devices}")
  _require(train.eval_batch_size > 0 and train.eval_batch_size % devices == 0,
           "train.eval_batch_size",
           f"must be a positive multiple of the {devices} devices, "
           f"got {train.eval_batch_size}")
  _require(0 <= train.warmup_steps < train.num_steps, "train.warmup_steps",
           f"must be in [0, num_steps), got {train.warmup_steps}")
  _require(train.seed >= -1, "train.seed",
           f"must be >= 0, or -1 for config.seed; got {train.seed}")
  for key in ("log_every", "eval_every"):
    _require(train[key] > 0, f"train.{key}", f"must be > 0, got {train[key]}")


def _check_optimizer(train) -> None:
  """The optimizer, its schedule and its hyperparameters."""
  _require(train.learning_rate > 0, "train.learning_rate",
           f"must be > 0, got {train.learning_rate}")
  _require(train.optimizer in OPTIMIZERS, "train.optimizer",
           f"unknown optimizer {train.optimizer!r}; known: "
           f"{', '.join(OPTIMIZERS)}")
  _require(train.schedule in SCHEDULES, "train.schedule",
           f"unknown schedule {train.schedule!r}; known: {', '.join(SCHEDULES)}")
  _require(train.weight_decay >= 0, "train.weight_decay",
           f"must be >= 0, got {train.weight_decay}")
  _require(0.0 <= train.momentum < 1.0, "train.momentum",
           f"must be in [0, 1), got {train.momentum}")
  _require(train.grad_clip_norm >= 0, "train.grad_clip_norm",
           f"must be >= 0, got {train.grad_clip_norm}")
  _require(0.0 <= train.label_smoothing < 1.0, "train.label_smoothing",
           f"must be in [0, 1), got {train.label_smoothing}")


def _check_checkpoint(checkpoint) -> None:
  _require(checkpoint.every_steps > 0, "checkpoint.every_steps",
           f"must be > 0, got {checkpoint.every_steps}")
  _require(checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep",
           f"must be >= 1, got {checkpoint.max_to_keep}")
