"""Compiling for a Cloud TPU slice that is not attached, on this host's CPU
with libtpu: every serving executable and the train step a model or a
checkpoint gets, whether each fits a chip's HBM, and what the TPU compiler
predicts of it (memory, FLOPs, device time, padding of the tiled layouts).

    accelerators.prepare_host(cpu_only=True)   # before jax starts a backend
    target = resolve("v5litepod-8")            # or "tpu:v5e:2x4"
    rows = [predict(e, target) for e in for_config(config, target, [1, 256])]
    print(markdown_table(rows))

It sits above rtjax.infer and rtjax.train (it compiles both) and beside
rtjax.bench (whose roofline it reuses): a launch's pre-flight check and a
search for a target ask it.
"""

from rtjax.target.executables import (DTYPES, Executable, as_served,
                                      for_checkpoint, for_config, serving,
                                      train)
from rtjax.target.predict import PREDICTED, predict
from rtjax.target.table import lessons, markdown_table, speedups
from rtjax.target.topology import Target, resolve

__all__ = ["DTYPES", "Executable", "PREDICTED", "Target", "as_served",
           "for_checkpoint", "for_config", "lessons", "markdown_table",
           "predict", "resolve", "serving", "speedups", "train"]
