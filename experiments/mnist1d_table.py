"""The MNIST-1D paper's table, reproduced: test accuracy per model family,
mean and spread over seeds, next to the paper's numbers.

  python -m experiments.mnist1d_table --seeds=0,1,2 \
      --results=experiments/results/mnist1d_table.md

Each row is `configs/mnist1d.py:<variant>` trained once per seed (the seed
sets initialization, batch order and the train/val split) with rtjax's
recipe on 3,600 training examples, 400 held out for validation; the paper's
four models also as `paper_<variant>`: the paper's recipe and protocol (all
4,000 training examples). `best` and the recipe were chosen on validation
accuracy, never on the test set.
"""

import time

import numpy as np
from absl import flags
from etils import epath

from configs import mnist1d
from experiments import cli
from rtjax.bench import provenance
from rtjax.train import train_and_evaluate

PAPER = {"logistic": "32%", "mlp": "68%", "cnn": "94%", "gru": "91%"}

_VARIANTS = flags.DEFINE_list("variants", ["logistic", "mlp", "cnn", "gru",
                                           "gru_stream", "lstm", "transformer",
                                           "best"], "configs/mnist1d.py variants.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per variant.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/mnist1d_table", "Runs go "
                               "to <workdir>/<variant>/seed<k> (resumable).")
_RESULTS = flags.DEFINE_string("results", "", "Markdown table to write, "
                               "stamped with how it was measured.")


def run_seeds(variant: str, seeds: list[int]) -> dict[str, np.ndarray]:
  """Test and val accuracy (%) and seconds of each seed's run."""
  runs = {"test": [], "val": [], "seconds": []}
  for seed in seeds:
    config = mnist1d.get_config(variant)
    config.seed = seed
    start = time.perf_counter()
    result = train_and_evaluate(
        config, epath.Path(_WORKDIR.value) / variant / f"seed{seed}")
    runs["seconds"].append(time.perf_counter() - start)
    for split in ("test", "val"):
      runs[split].append(100 * result.metrics.get(split, {}).get(
          "accuracy", np.nan))
  return {key: np.array(values) for key, values in runs.items()}


def spread(accuracies: np.ndarray) -> str:
  return f"{accuracies.mean():.1f} ± {accuracies.std():.1f}"


def main(argv):
  del argv
  cli.quiet_orbax()
  seeds = [int(s) for s in _SEEDS.value]
  lines = ["| variant | model | paper | paper's recipe, 4,000 train: test | "
           "rtjax recipe, 3,600 train: test | val | seconds per run |",
           "|" + " --- |" * 7]
  for variant in _VARIANTS.value:
    ours = run_seeds(variant, seeds)
    theirs = (run_seeds(f"paper_{variant}", seeds)
              if variant in mnist1d.PAPER else None)
    lines.append(
        f"| {variant} | {mnist1d.get_config(variant).model.name} | "
        f"{PAPER.get(variant, '—')} | "
        f"{spread(theirs['test']) if theirs else '—'} | "
        f"{spread(ours['test'])} | {ours['val'].mean():.1f} | "
        f"{ours['seconds'].mean():.0f} |")
    print(lines[-1], flush=True)
  table = "\n".join(lines) + "\n"
  if _RESULTS.value:
    provenance.write_results(_RESULTS.value, table)
  print(table)


if __name__ == "__main__":
  cli.run(main)
