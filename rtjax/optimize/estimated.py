"""A search for a Cloud TPU slice that is not attached (Settings.target):
every model is compiled for the slice on this host (rtjax.target) and its
latency is XLA:TPU's estimate of one call's device time at the search's
batch size: one number per executable, no percentile, excluding host
dispatch, transfers and queueing; predicted (XLA:TPU cost model,
uncalibrated), never measured. Predictions (accuracy) still run here, on
the same model compiled for this host in the same dtype.

A model served this way is an `Estimated`: callable like a CompiledModel
(its host twin runs the call), with the slice's executables where a
CompiledModel keeps its own (what the search's cost rows read).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from rtjax.infer import CompiledModel
from rtjax.models.stats import cost_analysis
from rtjax.target import PREDICTED, Target
from rtjax.target import layouts
from rtjax.target.executables import without_persistent_cache
from rtjax.target.predict import XLA_ESTIMATE_KEY

WHAT_IT_EXCLUDES = ("host dispatch, host-device transfers and queueing: a "
                    "call's device time alone")


@dataclasses.dataclass
class Estimated:
  """A model compiled for the slice (`on_target`, nothing placed) and for
  this host (`host`, which answers calls)."""
  host: CompiledModel
  on_target: CompiledModel
  batch: int

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self.host(images)

  @property
  def executables(self) -> dict:
    return self.on_target.executables

  @property
  def conv_lowering(self) -> dict:
    return self.on_target.conv_lowering

  @functools.cached_property  # read by every timing phase
  def estimate_ms(self) -> float:
    costs = cost_analysis(self.executables[self.batch])
    if not costs.get(XLA_ESTIMATE_KEY):
      raise RuntimeError(f"XLA:TPU gave no {XLA_ESTIMATE_KEY} estimate for "
                         "this executable")
    return 1e3 * float(costs[XLA_ESTIMATE_KEY])

  @functools.cached_property
  def padding(self) -> dict:
    """The share of the padded tiles that holds data and the array whose
    padding wastes the most, from the slice's compiled layouts."""
    executable = self.executables[self.batch]
    arrays = (layouts.weight_tiles(executable)
              + layouts.activation_tiles(executable.as_text()))
    worst = layouts.most_wasteful(arrays)
    return {"data_share": layouts.data_share(arrays),
            "most_padded": (f"{worst.name} {worst.dtype}{list(worst.shape)}: "
                            f"{worst.data_share:.0%} of its tiles hold data"
                            if worst else None)}


def build(target: Target, model, spec: dict, batch: int, options: dict,
          host: CompiledModel) -> Estimated:
  """`model` with `options` compiled for `target` (a data x model mesh over
  every chip for `batch` rows), beside its `host` twin."""
  with without_persistent_cache():  # it could not load them back
    on_target = CompiledModel(model, spec["args"]["input_shape"], [batch],
                              mesh=target.mesh(batch), spec=spec,
                              metadata=None, place=False, **options)
  return Estimated(host, on_target, batch)


def rows(served: Sequence[Estimated]) -> list[dict]:
  """What serving.interleaved gives for measured models, from the estimate:
  every percentile the one figure."""
  out = []
  for model in served:
    ms = model.estimate_ms
    out.append({**dict.fromkeys(("p50_ms", "p90_ms", "p99_ms", "max_ms",
                                 "p_ms"), ms),
                "throughput_per_s": model.batch / (ms * 1e-3), "calls": 0})
  return out


def label(target: str) -> str:
  return f"XLA:TPU's estimate on {target}, {PREDICTED}"
