"""Datasets by name, as models are: each registers its loader with what it
declares without loading (DatasetSpec: one example's shape and dtype, the
number of classes) and a check of its own `config.data` keys, so a config
is validated and a model built for it before any data is read (a gs://
directory included).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from rtjax.data.dataset import Dataset, DatasetSpec
from rtjax.errors import ConfigError

Require = Callable[[bool, str, str], None]


@dataclasses.dataclass(frozen=True)
class DatasetType:
  spec: DatasetSpec | Callable[[ml_collections.ConfigDict], DatasetSpec]
  load: Callable[[ml_collections.ConfigDict, int], Dataset]
  check: Callable[[ml_collections.ConfigDict, Require], None]


_DATASETS: dict[str, DatasetType] = {}


def register(spec: DatasetSpec | Callable[[ml_collections.ConfigDict],
                                         DatasetSpec],
             check: Callable[[ml_collections.ConfigDict, Require], None]
             = lambda data_config, require: None, name: str | None = None):
  """Decorator on a loader `load(data_config, seed) -> Dataset`: makes it the
  dataset `spec.name`. `spec` is what it declares, or a function of its
  `config.data` that does (a token dataset's example length is a setting;
  then `name` names it). `check(data_config, require)` validates the keys
  only this dataset reads with `require(condition, key under data.,
  message)`."""
  name = name or spec.name
  def wrap(load):
    if name in _DATASETS:
      raise ValueError(f"dataset {name!r} registered twice")
    _DATASETS[name] = DatasetType(spec, load, check)
    return load
  return wrap


def dataset_names() -> list[str]:
  return sorted(_DATASETS)


def dataset_type(name: str) -> DatasetType:
  if name not in _DATASETS:
    raise ConfigError(
        f"data.name: unknown dataset {name!r}; set --config.data.name to one "
        f"of {', '.join(dataset_names())}")
  return _DATASETS[name]


def dataset_spec(data_config) -> DatasetSpec:
  """What the dataset a config's `data` section names declares; reads no data."""
  spec = dataset_type(data_config.name).spec
  return spec if isinstance(spec, DatasetSpec) else spec(data_config)


def check_dataset(data_config, require: Require) -> None:
  """The named dataset's check of its own keys."""
  dataset_type(data_config.name).check(data_config, require)


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"data.{key}: {message}")


def load_dataset(data_config, seed: int) -> Dataset:
  """Builds the dataset a config's `data` section names (its keys checked
  first, for a hand-made config that skipped validation); what it loaded
  must be what it declared."""
  kind = dataset_type(data_config.name)
  kind.check(data_config, _require)
  dataset = kind.load(data_config, seed)
  declared = dataset_spec(data_config)
  if dataset.spec != declared:
    raise ValueError(f"dataset {data_config.name!r} declared {declared} but "
                     f"loaded {dataset.spec}")
  return dataset
