"""Latency predicted as t_total = t_compute + t_memory + t_communication.

FLOPs and bytes accessed come from XLA's cost analysis of the compiled
executable, bytes moved by collectives from its HLO; each is divided by a
machine peak: measured here (a large matmul, a large copy) or a chip's
published figures (labelled as published, with their source).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from rtjax import accelerators
from rtjax.models.stats import cost_analysis
from rtjax.timing import time_calls

# Vendor-published per-chip peaks: dense bf16 FLOP/s, HBM bytes/s and
# interconnect bytes/s (None where no figure was published). TPU: each
# generation's figures as rtjax.accelerators keeps them (ICI bidirectional per
# chip), with the Cloud TPU page that publishes them. H100 SXM: NVIDIA's
# datasheet figures (dense bf16, without sparsity) as reproduced by the
# sources given; no dense bf16 figure for the H200 was found in a source, so
# it is not listed.
PUBLISHED_PEAKS = {
    **{f"tpu_{g.name}": {"flops_per_s": g.bf16_flops_per_s,
                         "bytes_per_s": g.hbm_bytes_per_s,
                         "comm_bytes_per_s": g.ici_bytes_per_s,
                         "source": g.source}
       for g in accelerators.GENERATIONS},
    "h100_sxm": {"flops_per_s": 989.4e12, "bytes_per_s": 3350e9,
                 "comm_bytes_per_s": 900e9,
                 "source": "NVIDIA H100 datasheet (dense bf16 = half the "
                           "1,979 TFLOPS sparse figure; NVLink 900 GB/s)"},
}

_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str) -> int:
  """Bytes of the results of every collective op in an HLO module."""
  total = 0
  for match in _COLLECTIVE.finditer(hlo_text):
    for dtype, dims in _ARRAY.findall(match.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      total += size * _BYTES[dtype]
  return total


def measure_peaks(matmul_size: int = 2048, copy_mb: int = 256,
                  repeats: int = 5) -> dict:
  """This machine's f32 matmul FLOP/s and copy bandwidth (best of repeats)."""
  a = jnp.ones((matmul_size, matmul_size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  best = min(time_calls({"matmul": lambda: matmul(a).block_until_ready()},
                        repeats, warmup=1)["matmul"])
  flops = 2 * matmul_size ** 3 / best
  x = jnp.ones((copy_mb * 2 ** 20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v + 1)
  best = min(time_calls({"copy": lambda: copy(x).block_until_ready()},
                        repeats, warmup=1)["copy"])
  bandwidth = 2 * x.nbytes / best
  cpu = jax.devices()[0].platform == "cpu"
  # Simulated CPU devices share one memory: a collective is a copy there.
  return {"flops_per_s": flops, "bytes_per_s": bandwidth,
          "comm_bytes_per_s": bandwidth if cpu else None,
          "source": f"measured on this machine ({jax.devices()[0].platform}: "
                    f"{matmul_size}^2 f32 matmul, {copy_mb} MB read+write"
                    + ("; collectives at copy bandwidth" if cpu else "") + ")"}


def breakdown(compiled: jax.stages.Compiled, peaks: dict,
              costs: dict | None = None) -> dict:
  """Predicted seconds per term for one call of a compiled executable;
  `costs`: its cost_analysis when the caller already has it."""
  costs = cost_analysis(compiled) if costs is None else costs
  flops = float(costs.get("flops", 0.0))
  accessed = float(costs.get("bytes accessed", 0.0))
  comm = collective_bytes(compiled.as_text())
  t_compute = flops / peaks["flops_per_s"]
  t_memory = accessed / peaks["bytes_per_s"]
  comm_peak = peaks.get("comm_bytes_per_s")
  t_comm = comm / comm_peak if comm and comm_peak else 0.0
  return {"flops": flops, "bytes_accessed": accessed, "collective_bytes": comm,
          "t_compute_s": t_compute, "t_memory_s": t_memory, "t_comm_s": t_comm,
          "t_predicted_s": t_compute + t_memory + t_comm}
