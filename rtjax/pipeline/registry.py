"""Stage types by name, as big_vision registers its evaluators: each type
declares the keys of its `config.stage.<name>` section with their defaults,
checks its values, and runs. A stage is `(context) -> TrainResult`: it starts
from its parent's checkpoint and writes its own, with lineage in the
metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
from etils import epath

from rtjax import config as config_lib
from rtjax.data import Dataset
from rtjax.errors import ConfigError
from rtjax.train import Stage, TrainResult, train_model

# Keys every stage section has: its type, the stage whose checkpoint it
# starts from (default: the previous one) and overrides of config.train.
COMMON = {"type": "", "parent": "", "train": {}}


@dataclasses.dataclass(frozen=True)
class Context:
  """What a stage's run gets: the whole config, its own section and train
  settings, where its parent's checkpoint is and where its own goes."""
  config: ml_collections.ConfigDict
  name: str
  section: ml_collections.ConfigDict
  train_cfg: ml_collections.ConfigDict
  parent_dir: epath.Path | None
  stage_dir: epath.Path
  dataset: Dataset

  @property
  def seed(self) -> int:
    """Of the stage's model initialization and batch order."""
    return config_lib.init_seed(self.config, self.train_cfg)

  def train(self, stage: Stage) -> TrainResult:
    return train_model(self.config, self.train_cfg, self.stage_dir,
                       self.dataset, stage)


@dataclasses.dataclass(frozen=True)
class StageType:
  name: str
  defaults: dict
  run: Callable[[Context], TrainResult]
  check: Callable[[ml_collections.ConfigDict, Callable], None]
  needs_parent: bool = True


_TYPES: dict[str, StageType] = {}


def register(name: str, defaults: dict, check=lambda section, require: None,
             needs_parent: bool = True):
  """Decorator on a stage type's run function. `check(section, require)`
  validates its values with `require(condition, key, message)`."""
  def wrap(run):
    if name in _TYPES:
      raise ValueError(f"stage type {name!r} registered twice")
    _TYPES[name] = StageType(name, defaults, run, check, needs_parent)
    return run
  return wrap


def stage_type(name: str) -> StageType:
  if name not in _TYPES:
    raise ConfigError(f"unknown stage type {name!r}; known: "
                      f"{', '.join(sorted(_TYPES))}")
  return _TYPES[name]


def stage_types() -> list[str]:
  return sorted(_TYPES)


def stage_config(type: str, **values) -> ml_collections.ConfigDict:
  """A stage section with every key of its type, so command-line overrides
  such as --config.stage.prune.target_sparsity=0.9 work."""
  defaults = stage_type(type).defaults
  unknown = set(values) - set(COMMON) - set(defaults)
  if unknown:
    raise ConfigError(f"stage type {type!r} has no key(s) {sorted(unknown)}; "
                      f"its keys: {sorted(set(COMMON) | set(defaults))}")
  return ml_collections.ConfigDict({**COMMON, **defaults, **values,
                                    "type": type})


def validate_stages(config, train_keys) -> None:
  """Raises ConfigError naming the first bad key of config.stages/stage."""
  def require(condition: bool, key: str, message: str) -> None:
    if not condition:
      raise ConfigError(f"config.{key}: {message}")

  names = list(config.stages)
  require(len(set(names)) == len(names), "stages",
          f"stage names must be unique, got {names}")
  for name in names:
    require(name in config.stage, "stages",
            f"stage {name!r} has no section config.stage.{name}")
  for name, section in config.stage.items():
    key = f"stage.{name}"
    require(name in names, key, f"is not listed in config.stages {names}")
    require(section.get("type") in _TYPES, f"{key}.type",
            f"unknown stage type {section.get('type')!r}; known: "
            f"{', '.join(stage_types())}")
    kind = _TYPES[section.type]
    allowed = set(COMMON) | set(kind.defaults)
    unknown = sorted(set(section) - allowed)
    require(not unknown, key, f"unknown key(s) {unknown} for a "
            f"{section.type!r} stage; its keys: {sorted(allowed)}")
    bad = sorted(set(section.get("train", {})) - set(train_keys))
    require(not bad, f"{key}.train", f"unknown train key(s) {bad}")
    parent = section.get("parent") or ""
    index = names.index(name)
    require(not parent or parent in names[:index], f"{key}.parent",
            f"{parent!r} is not a stage before {name!r} in {names}")
    require(index > 0 or not kind.needs_parent, key,
            f"the first stage must be a 'train' stage, not {section.type!r}")
    kind.check(section, lambda ok, sub, message: require(
        ok, f"{key}.{sub}", message))
