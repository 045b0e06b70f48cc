"""Puts checkpoints side by side: accuracy, agreement and KL against a
reference, parameters, FLOPs, bytes, dtypes, p50/p99 latency, Pareto front.

  python -m experiments.compare --workdir=workdirs/compress --batch_sizes=1,256
  python -m experiments.compare --checkpoints=A,B,C --reference=B \
      --latency_budget_ms=0.3 --output_dir=/tmp/cmp

  python -m experiments.compare --workdir=workdirs/compress --target=v5litepod-8

--target also compiles every checkpoint for a Cloud TPU slice on this host
(the [tpu] extra) and adds what XLA:TPU predicts there, in its own section:
predicted figures never share a column with measured ones.

Data: the first checkpoint's own dataset split unless overridden with
--config.data.<key>=... (e.g. --config.data.dir=/data/cifar-10-batches-py).
Writes compare.md/.json/.csv/.png to --output_dir (default: --workdir).
"""

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import cli
from rtjax import compare as compare_lib
from rtjax import target as target_lib
from rtjax.checkpoint import checkpoint_dataset
from rtjax.config import base_config

_CHECKPOINTS = flags.DEFINE_list("checkpoints", [], "Checkpoint paths.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A run: all its stages.")
_REFERENCE = flags.DEFINE_string("reference", None, "Stage name or path of "
                                 "the reference (default: the first).")
_BATCH_SIZES = cli.define_batch_sizes(["1", "256"], "Latency batch sizes; "
                                      "the first one's p99 is the Pareto axis.")
_ITERS = flags.DEFINE_integer("iters", 200, "Timed calls per model and batch.")
_BUDGET = flags.DEFINE_float("latency_budget_ms", None, "Pick the most "
                             "accurate checkpoint whose p99 fits.")
_SPLIT = flags.DEFINE_enum("split", "test", ["val", "test"], "Split to use.")
_OUTPUT = flags.DEFINE_string("output_dir", "", "Where the reports go.")
_RESULTS = flags.DEFINE_string("results", "", "Also write the table, stamped "
                               "with how it was measured, to this file (and "
                               "the plot beside it), e.g. "
                               "experiments/results/compress_compare.md.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", ml_collections.ConfigDict({"data": base_config().data}),
    "Data overrides: --config.data.<key>=value.")
_SERVING = cli.ServingFlags()
_TARGET = flags.DEFINE_string(
    "target", "", "Also compile each checkpoint, as it is served on a TPU, "
    "for this Cloud TPU slice (v5litepod-8, tpu:v5e:2x4) and report XLA:TPU's "
    "predictions there (needs the [tpu] extra).")


def on_target(name: str, loaded, batches, reference: str):
  """(markdown, rows): each checkpoint's serving executables on the slice."""
  target = target_lib.resolve(name)
  rows = [{"family": item.name, **target_lib.predict(e, target)}
          for item in loaded for e in target_lib.as_served(
              item.model, item.metadata, target, batches)]
  return (f"## On {name}: predicted, not measured\n\n"
          + target_lib.markdown_table(rows) + "\n"
          + target_lib.speedups(rows, reference, batches), rows)


def main(argv):
  del argv
  serving = _SERVING.setup()
  batches = cli.batch_sizes(_BATCH_SIZES)
  paths = list(_CHECKPOINTS.value)
  if _WORKDIR.value:
    paths += [str(p) for p in compare_lib.stage_checkpoints(_WORKDIR.value)]
  if not paths:
    raise compare_lib.CompareError("give --checkpoints=A,B or --workdir=RUN")
  loaded = compare_lib.load_all(paths)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  split = getattr(checkpoint_dataset(loaded[0].metadata,
                                     overrides.get("data")), _SPLIT.value)
  rows = compare_lib.compare(loaded, split, _REFERENCE.value, batches,
                             _ITERS.value, **serving)
  predicted = (on_target(_TARGET.value, loaded, batches, rows[0]["reference"])
               if _TARGET.value else None)
  out = _OUTPUT.value or _WORKDIR.value or "."
  summary = compare_lib.write_outputs(rows, batches, out, _BUDGET.value,
                                      _RESULTS.value or None, predicted)
  print(summary["markdown"])
  print(f"reports in {out}: compare.md, compare.json, compare.csv, compare.png")


if __name__ == "__main__":
  cli.run(main)
