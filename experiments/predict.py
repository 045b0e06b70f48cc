"""Sharded inference of a checkpoint on its own dataset split, on one or many processes.

  python -m experiments.predict --checkpoint=workdirs/default --mesh=data:1 \
      --output=workdirs/default/predict

Multi-process (each process feeds its block of rows; only process 0 writes):
  python -m experiments.predict --checkpoint=... --mesh=data:4 --output=... \
      --coordinator_address=localhost:12345 --num_processes=2 --process_id=0
On Cloud TPU pass --multihost and no coordinator flags.
"""

import json
import math

import jax
import numpy as np
from absl import flags
from etils import epath

from experiments import cli
from rtjax.checkpoint import checkpoint_dataset
from rtjax.infer import CompiledModel, make_mesh, parse_mesh
from rtjax.infer.cache import cache_counts, enable_compilation_cache
from rtjax.infer.lowering import describe

_CHECKPOINT = cli.define_checkpoint()
_OUTPUT = flags.DEFINE_string("output", None, "Directory for logits.npy and "
                              "results.json (written by process 0).",
                              required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"],
                           "Split of the checkpoint's own dataset.")
_MESH = flags.DEFINE_string("mesh", "", "Axes, e.g. data:4,model:2; default: "
                            "all devices on data.")
_BATCH_SIZES = cli.define_batch_sizes(["8", "64", "256"], "Compiled batch "
                                      "buckets (global rows).")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "", "Persistent XLA "
                             "compilation cache (local or gs://).")
_MULTIHOST = cli.MultihostFlags()
_SERVING = cli.ServingFlags()


def main(argv):
  del argv
  serving = _SERVING.setup()
  batch_sizes = cli.batch_sizes(_BATCH_SIZES)
  _MULTIHOST.initialize()
  if _CACHE.value:
    enable_compilation_cache(_CACHE.value)
  mesh = make_mesh(parse_mesh(_MESH.value) if _MESH.value else None)
  model = CompiledModel.from_checkpoint(
      _CHECKPOINT.value, batch_sizes=batch_sizes, mesh=mesh, **serving)
  split = getattr(checkpoint_dataset(model.metadata), _SPLIT.value)

  # Process i feeds rows [i*per, (i+1)*per), zero-padded to the same count.
  processes, index = jax.process_count(), jax.process_index()
  per = math.ceil(len(split) / processes)
  rows = np.zeros((per, *split.images.shape[1:]), np.float32)
  mine = split.images[index * per:(index + 1) * per]
  rows[:len(mine)] = mine
  logits = model(rows)[:len(split)]

  if index == 0:
    out = epath.Path(_OUTPUT.value)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "logits.npy").open("wb") as f:
      np.save(f, logits)
    results = {
        "checkpoint": _CHECKPOINT.value, "split": _SPLIT.value,
        "examples": len(split), "processes": processes,
        "mesh": dict(mesh.shape),
        "accuracy": float(np.mean(np.argmax(logits, -1) == split.labels)),
        "compile_seconds": model.compile_seconds,
        "conv_lowering": {batch: describe(lowering) for batch, lowering
                          in model.conv_lowering.items()},
        "compilation_cache": cache_counts() if _CACHE.value else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
  cli.run(main)
