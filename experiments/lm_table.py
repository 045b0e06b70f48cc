"""Character language models on Shakespeare's plays, side by side: test
bits per character of n-gram baselines and of `configs/lm.py` variants,
with each variant's training minutes on this machine.

  python -m experiments.lm_table --runs=nanogpt_baby,nanogpt_baby:4500,cpu \
      --results=experiments/results/lm_shakespeare.md

A run is a variant, or variant:steps for the same recipe trained longer
(its cosine schedule stretched to those steps): e.g. nanoGPT's baby for as
many minutes as `cpu` takes. Runs go to <workdir>/<run> and resume; the
split is by play (rtjax.data.shakespeare), so the test plays are unseen.
A model is scored on windows of its context, as it trained (a window's
first character has no context); an n-gram on the test stream.
"""

import math

from absl import flags
from etils import epath

from configs import lm
from experiments import cli
from rtjax.bench import provenance
from rtjax.data import load_dataset
from rtjax.train import ngram, train_and_evaluate
from rtjax.train.metrics import read_metrics

_RUNS = flags.DEFINE_list("runs", ["nanogpt_baby", "cpu"],
                          "configs/lm.py variants, each optionally :steps.")
_ORDERS = flags.DEFINE_list("ngram_orders", ["1", "5"], "n-gram baselines.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/lm", "Runs go to "
                               "<workdir>/<run> (resumable).")
_RESULTS = flags.DEFINE_string("results", "", "Markdown table to write, "
                               "stamped with how it was measured.")


def training_seconds(workdir: epath.Path) -> float:
  """Seconds of the training loop alone (its logged windows' steps over
  their measured steps per second; evaluation and saving excluded)."""
  seconds, last = 0.0, 0
  for row in read_metrics(workdir):
    if row["split"] == "train" and row.get("steps_per_sec"):
      seconds += (row["step"] - last) / row["steps_per_sec"]
      last = row["step"]
  return seconds


def train(run: str) -> dict:
  variant, _, steps = run.partition(":")
  config = lm.get_config(variant)
  if steps:
    config.train.num_steps = int(steps)
  workdir = epath.Path(_WORKDIR.value) / run.replace(":", "_")
  result = train_and_evaluate(config, workdir)
  args = config.model.args
  return {"name": f"`{variant}`" + (f", {steps} steps" if steps else ""),
          "model": (f"{args.depth} blocks, {args.embed_dim} wide, context "
                    f"{config.data.context}"),
          "bits": result.metrics["test"]["bits_per_token"],
          "accuracy": result.metrics["test"]["accuracy"],
          "minutes": training_seconds(workdir) / 60,
          "steps": config.train.num_steps}


def main(argv):
  del argv
  cli.quiet_orbax()
  data = load_dataset(lm.get_config("tiny").data, 0)
  # Consecutive windows' inputs are the split's character stream.
  streams = {s: getattr(data, s).images.reshape(-1) for s in ("train", "test")}
  lines = ["| model | what | test bits/char | test next-char acc. | "
           "training minutes here | steps |", "|" + " --- |" * 6]
  for order in (int(o) for o in _ORDERS.value):
    bits = ngram.bits_per_token(streams["train"], streams["test"], order,
                                data.num_classes)
    lines.append(f"| {order}-gram | counted on the training plays "
                 f"({'add-one' if order == 1 else 'interpolated absolute discounting'}) "
                 f"| {bits:.3f} | - | - | - |")
    print(lines[-1], flush=True)
  for run in _RUNS.value:
    row = train(run)
    lines.append(f"| {row['name']} | {row['model']} | {row['bits']:.3f} | "
                 f"{100 * row['accuracy']:.1f}% | {row['minutes']:.1f} | "
                 f"{row['steps']:,} |")
    print(lines[-1], flush=True)
  table = "\n".join(lines) + "\n"
  table += (f"\nUniform over the {data.num_classes} characters: "
            f"{math.log2(data.num_classes):.3f} bits/char.\n")
  if _RESULTS.value:
    provenance.write_results(_RESULTS.value, table)
  print(table)


if __name__ == "__main__":
  cli.run(main)
