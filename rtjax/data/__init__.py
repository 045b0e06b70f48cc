"""Datasets by name: `digits`, `digits32` (embedded) and `cifar10` (python batches)."""

from __future__ import annotations

from rtjax.data import cifar10, digits
from rtjax.data.batches import TrainBatches, eval_batches
from rtjax.data.dataset import Dataset, Split
from rtjax.errors import ConfigError

DATASET_NAMES = ("digits", "digits32", "cifar10")


def load_dataset(data_config, seed: int) -> Dataset:
  """Builds the dataset a config's `data` section names."""
  name = data_config.name
  if name in ("digits", "digits32"):
    return digits.load(name, data_config.val_fraction,
                       data_config.test_fraction, seed)
  if name == "cifar10":
    return cifar10.load(data_config.dir, data_config.val_fraction, seed)
  raise ConfigError(f"data.name: unknown dataset {name!r}; set "
                    f"--config.data.name to one of {', '.join(DATASET_NAMES)}")


__all__ = ["DATASET_NAMES", "Dataset", "Split", "TrainBatches",
           "eval_batches", "load_dataset"]
