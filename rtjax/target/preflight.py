"""A launch's pre-flight check: before a slice is created and paid for, the
experiment's train step and the serving executables its report times are
compiled for that slice on this host (rtjax.target), and an executable the
TPU compiler refuses, or whose bytes per chip exceed a chip's HBM, stops the
launch here with one line instead of on the workers.

The experiment is read from the launch's own arguments for experiments.main
(--config and its --config.* overrides); its shapes come from the dataset's
declaration, never from the data. Every figure is predicted (XLA:TPU's
memory analysis, uncalibrated).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from rtjax.compare import REPORT_BATCH_SIZES
from rtjax.errors import ConfigError, FlagError, LaunchError
from rtjax.target.executables import for_config
from rtjax.target.predict import predict
from rtjax.target.topology import resolve

GIB = 2 ** 30


class PreflightError(LaunchError):
  """An executable of the experiment cannot run on the requested slice."""


def experiment_config(main_args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config experiments.main would load from `main_args` (--config=
  file[:variant] and --config.* overrides; its other flags are ignored)."""
  argv = ["launch", *main_args]
  values = flags.FlagValues()
  # ml_collections finds the --config.* overrides in `sys_argv`.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  sys_argv=argv)
  try:
    values(argv, known_only=True)
    config = values.config
    if config is None:
      raise ConfigError("the experiment's arguments after -- give no "
                        "--config (e.g. --config=configs/default.py:tpu)")
    config.keys()  # a file that failed to load raises here
  except (flags.Error, OSError, KeyError, ValueError, TypeError) as e:
    raise ConfigError(f"the experiment's --config after -- cannot be "
                      f"loaded: {' '.join(str(e).split())[:300]}") from None
  return config


def _dtypes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """float32, and int8 when one of the pipeline's stages makes int8."""
  kinds = {config.stage[name].get("type")
           for name in config.get("stages") or ()}
  return ("float32", "int8") if "int8" in kinds else ("float32",)


def check(main_args: Sequence[str], accelerator_type: str,
          batch_sizes: Sequence[int] = REPORT_BATCH_SIZES) -> list[dict]:
  """One rtjax.target.predict row per executable of the experiment on the
  slice: its serving buckets and its train step."""
  config = experiment_config(main_args)
  try:
    target = resolve(accelerator_type)
  except FlagError as e:  # libtpu is not installed
    raise PreflightError(f"pre-flight: {e}; or launch with --skip_preflight"
                         ) from None
  return [{"family": config.model.name, **predict(e, target)}
          for e in for_config(config, target, batch_sizes, _dtypes(config))]


def refusal(row: dict) -> str | None:
  """Why `row`'s executable cannot run on its slice, or None."""
  name = (f"{row['what']} ({row['dtype']}, batch {row['batch']}, mesh "
          f"{row['mesh']})")
  if not row["compiled"]:
    return f"{name} does not compile for {row['target']}: {row['error']}"
  capacity = row["hbm_capacity"]
  if capacity and row["hbm_bytes"] > capacity:
    return (f"{name} needs {row['hbm_bytes'] / GIB:.2f} GiB per chip and a "
            f"{row['target']} chip has {capacity / GIB:.2f} GiB")
  return None


def require_fit(rows: Sequence[dict]) -> None:
  """A PreflightError naming the first executable that cannot run, what it
  needs against what a chip has, and the flags that change it."""
  for row in rows:
    reason = refusal(row)
    if reason:
      raise PreflightError(
          f"pre-flight: {reason} (predicted by the TPU compiler). Shrink the "
          "model or its batch (--config.model.*, --config.train.batch_size), "
          "choose a larger --accelerator_type, or pass --skip_preflight")
