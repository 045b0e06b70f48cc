"""Latency the way real-time systems are judged: percentiles, not means.

Each timed call is one compiled executable on device-resident inputs, ended
by block_until_ready; compilation happened before (reported apart). When
several models are compared they are timed interleaved (A, B, A, B, ...), so
machine noise hits them alike and their ratio is meaningful.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np

from rtjax.infer import CompiledModel


def percentiles(seconds: Sequence[float], batch: int) -> dict[str, float]:
  ms = np.asarray(seconds) * 1e3
  return {"p50_ms": float(np.percentile(ms, 50)),
          "p90_ms": float(np.percentile(ms, 90)),
          "p99_ms": float(np.percentile(ms, 99)),
          "max_ms": float(ms.max()),
          "throughput_per_s": float(batch / np.median(seconds)),
          "calls": len(ms)}


def interleaved_latency(served: Sequence[CompiledModel], batch: int,
                        iters: int = 200, warmup: int = 20,
                        seed: int = 0) -> list[dict[str, float]]:
  """Per model: latency percentiles of `batch`-row calls, timed in turns."""
  inputs = []
  for model in served:
    images = np.random.default_rng(seed).normal(
        size=(batch, *model.input_shape)).astype(np.float32)
    inputs.append(jax.device_put(images, model.input_sharding))
  times = [[] for _ in served]
  for i in range(warmup + iters):
    for k, (model, x) in enumerate(zip(served, inputs)):
      start = time.perf_counter()
      model.run_bucket(x).block_until_ready()
      if i >= warmup:
        times[k].append(time.perf_counter() - start)
  return [percentiles(t, batch) for t in times]


def host_overhead(model: CompiledModel, iters: int = 500,
                  warmup: int = 50) -> dict[str, float]:
  """p50 of three batch-1 paths, timed in turns: a trivial jitted call (the
  dispatch floor), the compiled model on a device-resident input, and the
  full request (numpy in, pad, run, trim, numpy out)."""
  images = np.zeros((1, *model.input_shape), np.float32)
  bucket = model.bucket_for(1)
  on_device = jax.device_put(np.zeros((bucket, *model.input_shape), np.float32),
                             model.input_sharding)
  trivial = jax.jit(lambda x: x + 1)
  paths = {"trivial_jit": lambda: trivial(on_device).block_until_ready(),
           "device_call": lambda: model.run_bucket(on_device).block_until_ready(),
           "request": lambda: model(images)}
  times = {name: [] for name in paths}
  for i in range(warmup + iters):
    for name, call in paths.items():
      start = time.perf_counter()
      call()
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  p50 = {name: float(np.median(t) * 1e6) for name, t in times.items()}
  return {f"{name}_p50_us": value for name, value in p50.items()} | {
      "request_overhead_us": p50["request"] - p50["device_call"]}
