"""Trains a model from a config: the default rtjax experiment.

  python -m experiments.main --config=configs/default.py --workdir=workdirs/default
  python -m experiments.main --config=configs/lenet5.py --workdir=... \
      --config.train.num_steps=500

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rtjax.config import ConfigError
from rtjax.train import CheckpointError, NonFiniteLossError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/default.py or configs/x.py:arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard "
    "events; reusing it resumes the run.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  """Orbax logs every file operation at INFO; keep its warnings and errors."""
  return "orbax" not in record.pathname or record.levelno >= logging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  try:
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, CheckpointError, FileNotFoundError) as e:
    logging.error("%s", e)
    sys.exit(2)
  except NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(1)
  if result.preempted:
    print(f"preempted at step {result.step}; rerun to resume", flush=True)
    return
  test = result.metrics.get("test", {})
  print(f"step {result.step}: test accuracy {test.get('accuracy', float('nan')):.4f}"
        f" (loss {test.get('loss', float('nan')):.4f}); checkpoints in "
        f"{result.checkpoint_dir}", flush=True)


if __name__ == "__main__":
  app.run(main)
