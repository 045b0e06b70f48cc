"""Configs: every shipped config validates, overrides work, bad keys and values are named."""

import glob
import importlib
import os

import pytest
from absl import flags
from ml_collections import config_flags

from rtjax import config as config_lib
from rtjax import pipeline
from tests.conftest import REPO, run_module

CONFIG_FILES = sorted(os.path.relpath(p, REPO)
                      for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


def parse(*argv):
  """Parses flags exactly as experiments/main.py defines them."""
  values = flags.FlagValues()
  argv = ["prog", *argv]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_shipped_configs_validate_and_document_their_command(path):
  module = importlib.import_module(path[:-3].replace(os.sep, "."))
  assert module.__doc__.strip().startswith(
      "python -m experiments.main --config=" + path), module.__doc__
  pipeline.validate(parse(f"--config={path}"))


def test_overrides_and_variants():
  config = parse("--config=configs/default.py:tiny",
                 "--config.train.learning_rate=0.5",
                 "--config.model.args.stage_widths=(4,8)")
  assert config.train.learning_rate == 0.5
  assert tuple(config.model.args.stage_widths) == (4, 8)
  assert config.train.num_steps == 150  # from the :tiny variant
  config_lib.validate(config)


def test_unknown_override_key_fails_with_its_name():
  with pytest.raises(Exception, match="lerning_rate"):
    parse("--config=configs/default.py", "--config.train.lerning_rate=1")


def test_unknown_key_in_a_config_file_is_named():
  config = config_lib.base_config()
  config.train.unlock()
  config.train.learing_rate = 0.1
  with pytest.raises(config_lib.ConfigError, match="train.learing_rate"):
    config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("train.learning_rate", 0.0, "train.learning_rate: must be > 0"),
    ("train.num_steps", 0, "train.num_steps: must be > 0"),
    ("train.optimizer", "lamb", "unknown optimizer 'lamb'"),
    ("train.warmup_steps", 5000, "train.warmup_steps"),
    ("data.name", "mnist", "unknown dataset 'mnist'"),
    ("model.name", "alexnet", "known: cnn1d, decoder, gru, lenet5, lstm, mlp, resnet, transformer1d, vit"),
    ("data.test_fraction", 1.5, "data.test_fraction"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps"),
])
def test_bad_values_are_named(key, value, message):
  config = config_lib.base_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_model_args_are_checked_against_the_family():
  config = config_lib.base_config()
  config.model.args.stage_width = (8,)
  with pytest.raises(config_lib.ConfigError, match="model.args.stage_width.*"
                     "stem_width, stage_widths"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.model.args.num_classes = 3
  with pytest.raises(config_lib.ConfigError, match="set from the dataset"):
    config_lib.validate(config)


@pytest.mark.slow
def test_batch_must_divide_over_devices():
  code = ("import jax; jax.config.update('jax_num_cpu_devices', 4)\n"
          "from rtjax import config as c\n"
          "cfg = c.base_config(); cfg.train.batch_size = 6\n"
          "c.validate(cfg)\n")
  result = run_module("tests.run_code", code)
  assert result.returncode != 0
  assert "train.batch_size: 6 is not divisible by the 4 devices" in result.stderr


@pytest.mark.slow
def test_cli_reports_bad_value_and_exits_nonzero(tmp_path):
  result = run_module("experiments.main", "--config=configs/default.py:tiny",
                      f"--workdir={tmp_path}",
                      "--config.train.learning_rate=-1")
  assert result.returncode == 2
  assert "config.train.learning_rate: must be > 0, got -1.0" in result.stderr
  assert not (tmp_path / "checkpoints").exists()
