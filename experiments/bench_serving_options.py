"""What each serving option buys against ONNX Runtime on the same weights.

  python -m experiments.bench_serving_options --checkpoint=workdirs/lenet5

Runs `experiments.bench --peers` once per option set, each in its own
process (the CPU dispatch mode is fixed when JAX starts), cumulatively:
jax's default asynchronous dispatch with XLA's convolutions, then synchronous
dispatch, then conv_lowering=auto, then embedded weights. Each ratio is
measured side by side with ONNX Runtime inside one run; prints a markdown
table and writes every run's JSON next to `--output`.
"""

import json
import subprocess
import sys

from absl import flags
from etils import epath

from experiments import cli
from rtjax.bench import provenance

_CHECKPOINT = cli.define_checkpoint()
_ITERS = flags.DEFINE_integer("iters", 300, "Timed calls per contender.")
_WARMUP = flags.DEFINE_integer("warmup", 30, "Untimed calls first.")
_LARGE_BATCH = flags.DEFINE_integer("large_batch", 256, "The throughput batch.")
_ONLY = flags.DEFINE_list("only", [], "Run only these rows (0-based); "
                          "default: all.")
_OUTPUT = flags.DEFINE_string("output", "serving_options", "Directory for "
                              "each run's JSON and the table (options.md).")

OPTION_SETS = {
    "async dispatch, XLA convs (jax defaults)": ["--cpu_async_dispatch"],
    "+ synchronous dispatch": [],
    "+ conv_lowering=auto": ["--conv_lowering=auto"],
    "+ embed_weights": ["--conv_lowering=auto", "--embed_weights"],
}


def main(argv):
  del argv
  out = epath.Path(_OUTPUT.value)
  out.mkdir(parents=True, exist_ok=True)
  large = _LARGE_BATCH.value
  lines = ["| options | lowering (batch: layer:rows x cols) | batch-1 p50 rtjax / ORT "
           f"| batch-{large} throughput rtjax / ORT |", "| --- | --- | --- | --- |"]
  for index, (name, options) in enumerate(OPTION_SETS.items()):
    if _ONLY.value and str(index) not in _ONLY.value:
      continue
    result_file = out / f"run{index}.json"
    run = subprocess.run(
        [sys.executable, "-m", "experiments.bench",
         f"--checkpoints={_CHECKPOINT.value}", f"--batch_sizes=1,{large}",
         f"--iters={_ITERS.value}", f"--warmup={_WARMUP.value}", "--peers",
         f"--output={result_file}",
         *options], capture_output=True, text=True)
    if run.returncode:
      cli.fail(f"{name}: experiments.bench failed:\n{run.stderr[-3000:]}")
    report = json.loads(result_file.read_text())
    (peers,) = report["peers"].values()  # the one checkpoint's, per batch
    ort = {int(b): peers[str(b)]["contenders"]["onnxruntime"]
           for b in (1, large)}
    (per_batch,) = report["lowering"].values()
    lowering = "; ".join(f"{b}: {r['chosen']}" for b, r in per_batch.items())
    lines.append(f"| {name} | {lowering} | {ort[1]['rtjax_p50_ratio']:.2f} | "
                 f"{ort[large]['rtjax_throughput_ratio']:.2f} |")
    print(lines[-1], flush=True)
  table = "\n".join(lines)
  provenance.write_results(out / "options.md", table + "\n")
  print(table)


if __name__ == "__main__":
  cli.run(main)
