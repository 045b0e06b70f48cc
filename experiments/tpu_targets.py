"""The target table: rtjax's model families (or one checkpoint) compiled for
Cloud TPU slices that are not attached, on this host's CPU with libtpu (the
`[tpu]` extra): each serving executable (batch buckets x float32, bf16,
int8) and each config's train step, whether it fits a chip's HBM, and what
the TPU compiler predicts of it.

  python -m experiments.tpu_targets \
      --results=experiments/results/tpu_targets.md
  python -m experiments.tpu_targets --checkpoint=workdirs/default \
      --targets=v5litepod-8 --batch_sizes=8,256

A family is its config's model, untrained: its shapes are all a compile
needs (rtjax.target). Every figure but the compile time is predicted (XLA:TPU
cost model, uncalibrated): no TPU ran anything.
"""

import time

from absl import flags, logging

from configs import default, lenet5, mnist1d, vit
from experiments import cli
from rtjax import target as target_lib
from rtjax.bench import provenance

# flag name -> (name in the table, config module, variant)
FAMILIES = {
    "cnn": ("default CNN", default, None),
    "lenet5": ("LeNet-5", lenet5, None),
    "vit": ("ViT", vit, None),
    "mlp": ("MLP", mnist1d, "mlp"),
    "cnn1d": ("1D CNN", mnist1d, "cnn"),
    "gru": ("GRU", mnist1d, "gru"),
    "lstm": ("LSTM", mnist1d, "lstm"),
    "transformer1d": ("1D Transformer", mnist1d, "transformer"),
}

_FAMILIES = flags.DEFINE_list("families", list(FAMILIES),
                              f"Model families: {', '.join(FAMILIES)}.")
_CHECKPOINT = cli.define_checkpoint(
    "A checkpoint to compile instead of the families (workdir, its "
    "checkpoints/ or one step directory).", required=False)
_TARGETS = flags.DEFINE_list(
    "targets", ["v5litepod-1", "v5litepod-8", "v6e-8", "v5p-8"],
    "TPU slices: gcloud accelerator types (v5litepod-8) or topologies "
    "(tpu:v5e:2x4).")
_BATCH_SIZES = cli.define_batch_sizes(["1", "256"], "Serving batch buckets.")
_DTYPES = flags.DEFINE_list("dtypes", list(target_lib.DTYPES),
                            "Serving dtypes: float32, bfloat16, int8.")
_MODEL_AXIS = flags.DEFINE_integer(
    "model_axis", None, "Chips per weight split (tensor parallel); default: "
    "the fewest that let each batch divide over the remaining chips.")
_RESULTS = flags.DEFINE_string("results", "", "Markdown file to write (with "
                               "its provenance); default: print the table.")


def sources(targets, batch_sizes, dtypes):
  """(family name, target, executables) for the checkpoint or each family."""
  for target in targets:
    if _CHECKPOINT.value:
      yield _CHECKPOINT.value, target, target_lib.for_checkpoint(
          _CHECKPOINT.value, target, batch_sizes, dtypes, _MODEL_AXIS.value)
      continue
    for key in _FAMILIES.value:
      name, module, variant = FAMILIES[key]
      yield name, target, target_lib.for_config(
          module.get_config(variant), target, batch_sizes, dtypes,
          _MODEL_AXIS.value)


def main(argv):
  del argv
  unknown = [f for f in _FAMILIES.value if f not in FAMILIES]
  bad_dtypes = [d for d in _DTYPES.value if d not in target_lib.DTYPES]
  if unknown or bad_dtypes:
    raise cli.FlagError(
        f"unknown --families {unknown} or --dtypes {bad_dtypes}: families "
        f"are {', '.join(FAMILIES)}; dtypes {', '.join(target_lib.DTYPES)}")
  batch_sizes = cli.batch_sizes(_BATCH_SIZES)
  targets = [target_lib.resolve(name) for name in _TARGETS.value]
  rows, start = [], time.perf_counter()
  for family, target, executables in sources(targets, batch_sizes,
                                             _DTYPES.value):
    rows += [{"family": family, **target_lib.predict(e, target)}
             for e in executables]
    logging.info("%s on %s: %d executables", family, target.name,
                 len(executables))
  elapsed = time.perf_counter() - start
  compiled = sum(row["compiled"] for row in rows)
  markdown = "\n".join([
      "# rtjax executables compiled for Cloud TPU slices", "",
      f"{len(rows)} executables, {compiled} compiled and {len(rows) - compiled}"
      f" refused, in {elapsed:.0f} s on this host (measured). Models are "
      "their configs' shapes, untrained; int8 is qwix PTQ of weights and "
      "activations (activation scales computed in each call).", "",
      "## What it teaches", "",
      target_lib.lessons(rows, targets[0].name, min(batch_sizes),
                         max(batch_sizes)),
      "## Every executable", "", target_lib.markdown_table(rows)])
  if _RESULTS.value:
    print(f"wrote {provenance.write_results(_RESULTS.value, markdown)}")
  else:
    print(markdown)


if __name__ == "__main__":
  cli.run(main)
