"""Where conv lowering wins: each conv layer of a checkpoint alone, as XLA's
convolution and as each banded-matmul block, then the whole model served
with XLA's convs or `auto`, weights passed or embedded. Calls interleaved.

  python -m experiments.bench_lowering --checkpoint=workdirs/lenet5 --batch_sizes=1,256

GFLOP/s counts the conv's own FLOPs (2 x multiply-adds), not the extra ones
a banded matrix multiplies by zero, so rows compare as work done per second.
"""

import json

import jax
import numpy as np
from absl import flags
from etils import epath

from experiments import cli
from rtjax.bench.latency import interleaved_latency
from rtjax.checkpoint import load_checkpoint
from rtjax.infer import CompiledModel, fold_batchnorm, lowering
from rtjax.models.stats import layer_shapes
from rtjax.timing import time_calls

_CHECKPOINT = cli.define_checkpoint()
_BATCH_SIZES = cli.define_batch_sizes(["1", "256"])
_ITERS = flags.DEFINE_integer("iters", 50, "Timed calls per variant.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON results file.")


def time_interleaved(calls: dict, x, iters: int) -> dict[str, float]:
  """Median seconds per call of each function, compiled, called in turns."""
  compiled = {name: jax.jit(f).lower(x).compile() for name, f in calls.items()}
  times = time_calls(
      {name: (lambda c: lambda: c(x).block_until_ready())(c)
       for name, c in compiled.items()}, iters, warmup=3)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv):
  del argv
  cli.quiet_orbax()
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # as served
  batches = cli.batch_sizes(_BATCH_SIZES)
  model, metadata = load_checkpoint(_CHECKPOINT.value)
  input_shape = tuple(metadata["model"]["args"]["input_shape"])
  folded = fold_batchnorm(model)
  shapes = layer_shapes(folded, input_shape)
  results = {"layers": [], "models": []}
  for path, blocks in lowering.candidate_blocks(folded, input_shape).items():
    conv = lowering.module_at(folded, path)
    (_, *in_shape), (_, *out_shape) = shapes[path]
    flops = 2 * np.prod(out_shape) * np.prod(conv.kernel_size) * conv.in_features
    variants = {"xla": conv} | {
        lowering.describe({"": b})[1:]: lowering.lowered_conv(conv, in_shape, b)
        for b in blocks}
    for batch in batches:
      x = jax.numpy.asarray(np.random.default_rng(0).normal(
          size=(batch, *in_shape)).astype(np.float32))
      seconds = time_interleaved(
          {name: (lambda v: lambda x: v(x))(v) for name, v in variants.items()},
          x, _ITERS.value)
      for name, s in seconds.items():
        row = {"layer": path, "batch": batch, "lowering": name, "ms": s * 1e3,
               "gflops": flops * batch / s / 1e9}
        results["layers"].append(row)
        print(f"{path:<20} batch {batch:>4} {name:>6} {row['ms']:9.3f} ms "
              f"{row['gflops']:7.1f} GFLOP/s", flush=True)
  options = {"xla": {}, "xla, embedded": {"embed_weights": True},
             "auto": {"conv_lowering": "auto"},
             "auto, embedded": {"conv_lowering": "auto", "embed_weights": True}}
  served = [CompiledModel(model, input_shape, batch_sizes=batches, **o)
            for o in options.values()]
  for batch in batches:
    for name, s, r in zip(options, served,
                          interleaved_latency(served, batch, _ITERS.value)):
      row = {"model": name, "batch": batch, "p50_ms": r["p50_ms"],
             "lowering": lowering.describe(s.conv_lowering[batch])}
      results["models"].append(row)
      print(f"model {name:<16} batch {batch:>4} p50 {r['p50_ms']:9.3f} ms "
            f"({row['lowering']})", flush=True)
  if _OUTPUT.value:
    epath.Path(_OUTPUT.value).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  cli.run(main)
