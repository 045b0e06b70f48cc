"""What an executable compiled for a target slice would need and take there,
as the TPU compiler and its cost model predict it. No TPU ran anything:
every figure here is predicted (XLA:TPU cost model, uncalibrated).

  * HBM per chip: the executable's memory analysis on one chip after
    sharding, arguments + outputs + temporaries (less what outputs alias),
    beside the chip's published capacity;
  * FLOPs and bytes accessed per chip: XLA:TPU's cost analysis;
  * XLA:TPU's estimate of one call's device time (its cost analysis's
    `optimal_seconds`: best effort and version-dependent, it excludes host
    dispatch and transfers);
  * rtjax's roofline for the same executable (rtjax.bench.breakdown):
    t_compute + t_memory + t_comm with the chip's published peaks (the int8
    rate for an int8 executable where one is published, else bf16: jax's
    default precision runs float32 matmuls on a TPU's MXU in bf16 passes);
  * padding: the share of the padded tiles that holds data, over the
    weights, over the activations and over both (rtjax.target.layouts), and
    the array whose padding wastes the most.
"""

from __future__ import annotations

from rtjax.bench import breakdown as breakdown_lib
from rtjax.models.stats import cost_analysis
from rtjax.target import layouts
from rtjax.target.executables import Executable
from rtjax.target.topology import Target

PREDICTED = "predicted (XLA:TPU cost model, uncalibrated)"
XLA_ESTIMATE_KEY = "optimal_seconds"


def peaks(target: Target, dtype: str) -> dict:
  """The chip's published peaks for the roofline (rtjax.accelerators'
  figures, as rtjax.bench.breakdown keeps them); the int8 rate for int8."""
  chosen = dict(breakdown_lib.PUBLISHED_PEAKS[f"tpu_{target.generation.name}"])
  if dtype == "int8" and target.generation.int8_ops_per_s:
    chosen["flops_per_s"] = target.generation.int8_ops_per_s
  return chosen


def hbm_per_chip(compiled) -> int:
  """Bytes one chip holds for a call: arguments + outputs + temporaries,
  less outputs that alias (reuse) an argument's buffer."""
  memory = compiled.memory_analysis()
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def predict(executable: Executable, target: Target) -> dict:
  """One row: the executable's identity and, if it compiled, its predicted
  figures; only its compile time on this host (`compile_s`) is measured."""
  row = {"target": target.name, "what": executable.what,
         "dtype": executable.dtype, "batch": executable.batch,
         "mesh": executable.mesh, "compiled": executable.compiled is not None,
         "error": executable.error, "compile_s": executable.compile_s,
         "hbm_capacity": target.hbm_bytes}
  compiled = executable.compiled
  if compiled is None:
    return row
  costs = cost_analysis(compiled)
  roofline = breakdown_lib.breakdown(
      compiled, peaks(target, executable.dtype), costs)
  weights = layouts.weight_tiles(compiled)
  activations = layouts.activation_tiles(compiled.as_text())
  worst = layouts.most_wasteful(weights + activations)
  row.update({
      "hbm_bytes": hbm_per_chip(compiled),
      "flops": roofline["flops"],
      "bytes_accessed": roofline["bytes_accessed"],
      "xla_estimate_s": costs.get(XLA_ESTIMATE_KEY),
      "t_compute_s": roofline["t_compute_s"],
      "t_memory_s": roofline["t_memory_s"],
      "t_comm_s": roofline["t_comm_s"],
      "roofline_s": roofline["t_predicted_s"],
      "weights_data_share": layouts.data_share(weights),
      "activations_data_share": layouts.data_share(activations),
      "data_share": layouts.data_share(weights + activations),
      "most_padded": (f"{worst.name} {worst.dtype}{list(worst.shape)} "
                      f"{worst.data_share:.0%}" if worst else None)})
  return row
