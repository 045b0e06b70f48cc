"""Trains a model from a config: the default rtjax experiment.

  python -m experiments.main --config=configs/default.py --workdir=workdirs/default
  python -m experiments.main --config=configs/lenet5.py --workdir=... \
      --config.train.num_steps=500

Rerunning with the same --workdir resumes from its latest checkpoint.
Multi-process: --multihost on Cloud TPU (see experiments.launch), or
--coordinator_address=host:port --num_processes=N --process_id=i elsewhere.
"""

import os

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli
from rtjax import compare
from rtjax.data import load_dataset
from rtjax.errors import FlagError
from rtjax.infer.cache import enable_compilation_cache
from rtjax.pipeline import run_pipeline
from rtjax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/default.py or configs/x.py:arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (local or gs://) for checkpoints, metrics.jsonl "
    "and TensorBoard events; reusing it resumes the run.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent XLA compilation cache; default "
    "$JAX_COMPILATION_CACHE_DIR if set, else <workdir>/compilation_cache; '' "
    "disables it.")
_REPORT = flags.DEFINE_bool(
    "report", True, "End by comparing the run's checkpoints (compare.md/.json/"
    ".csv/.png in the workdir; single-process runs).")
_MULTIHOST = cli.MultihostFlags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise FlagError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_orbax()
  config = cli.config(_CONFIG)
  _MULTIHOST.initialize()
  cache = _CACHE.value
  if cache is None:
    cache = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
             or f"{_WORKDIR.value.rstrip('/')}/compilation_cache")
  if cache:
    enable_compilation_cache(cache)
  # A failed run (a NaN loss, a full disk) is a RunError: cli.run prints its
  # one line and exits 1.
  results = (run_pipeline(config, _WORKDIR.value) if config.stages
             else {"train": train_and_evaluate(config, _WORKDIR.value)})
  for stage, outcome in results.items():
    if outcome.preempted:
      print(f"{stage}: preempted at step {outcome.step}; rerun to resume",
            flush=True)
      return
    test = outcome.metrics.get("test", {})
    bits = (f", {test['bits_per_token']:.3f} bits/token"
            if "bits_per_token" in test else "")
    print(f"{stage}: step {outcome.step}: test accuracy "
          f"{test.get('accuracy', float('nan')):.4f} (loss "
          f"{test.get('loss', float('nan')):.4f}{bits}); checkpoints in "
          f"{outcome.checkpoint_dir}", flush=True)
  if _REPORT.value and jax.process_count() == 1:
    rows = compare.compare(compare.load_all(
        compare.stage_checkpoints(_WORKDIR.value)), load_dataset(
            config.data, config.seed).test, iters=100)
    print(compare.write_outputs(rows, compare.REPORT_BATCH_SIZES,
                                _WORKDIR.value)["markdown"])


if __name__ == "__main__":
  cli.run(main)
