"""Latency the way real-time systems are judged: percentiles, not means.

Each timed call is one compiled executable on device-resident inputs, ended
by block_until_ready; compilation happened before (reported apart). When
several models are compared they are timed interleaved (A, B, A, B, ...), so
machine noise hits them alike and their ratio is meaningful.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import numpy as np

from rtjax.infer import CompiledModel
from rtjax.infer.streaming import StreamingModel
from rtjax.timing import time_calls


def profiled(directory: str | None):
  """A jax.profiler trace (XLA's per-op events included, and a Perfetto
  trace.json.gz) of what runs inside, written under `directory`; nothing
  when it is empty."""
  if not directory:
    return contextlib.nullcontext()
  return jax.profiler.trace(directory, create_perfetto_trace=True)


def percentiles(seconds: Sequence[float], batch: int) -> dict[str, float]:
  ms = np.asarray(seconds) * 1e3
  return {"p50_ms": float(np.percentile(ms, 50)),
          "p90_ms": float(np.percentile(ms, 90)),
          "p99_ms": float(np.percentile(ms, 99)),
          "max_ms": float(ms.max()),
          "throughput_per_s": float(batch / np.median(seconds)),
          "calls": len(ms)}


def sample_inputs(model: CompiledModel, batch: int, seed: int = 0
                  ) -> np.ndarray:
  """`batch` rows to time a model on: normal features, or token id 0 for a
  token model (its compute does not depend on which tokens)."""
  shape = (batch, *model.input_shape)
  if not np.issubdtype(model.input_dtype, np.floating):
    return np.zeros(shape, model.input_dtype)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def interleaved_latency(served: Sequence[CompiledModel], batch: int,
                        iters: int = 200, warmup: int = 20, seed: int = 0,
                        seconds: float | None = None, max_iters: int = 3000,
                        percentile: float | None = None, block: int = 10,
                        settle: int = 1) -> list[dict[str, float]]:
  """Per model: latency percentiles of `batch`-row calls, timed in turns of
  `block` calls after `settle` untimed ones (rtjax.timing.time_calls): a
  model called right after another runs with the other's data in the
  caches and its threads winding down (measured here, a ResNet at batch
  256 alternating call by call with a smaller one: p90 4.97 ms instead of
  2.66 ms, in a one-off probe), which no server serving it sees. With
  `seconds`, as many turns as fit in about that long (at least `iters`, at
  most `max_iters`: a tail percentile needs hundreds), and with
  `percentile`, that one too as `p_ms`."""
  calls = {}
  for k, model in enumerate(served):
    x = jax.device_put(sample_inputs(model, batch, seed), model.input_sharding)
    calls[k] = (lambda m, x: lambda: m.run_bucket(x).block_until_ready())(model, x)
  if seconds is not None:
    probe = time_calls(calls, 3, warmup=2)
    per_round = sum(float(np.median(t)) for t in probe.values())
    per_round *= (block + settle) / block
    iters = int(np.clip(seconds / max(per_round, 1e-7), iters, max_iters))
  times = time_calls(calls, iters, warmup, block=block, settle=settle)
  rows = [percentiles(times[k], batch) for k in calls]
  if percentile is not None:
    for row, k in zip(rows, calls):
      row["p_ms"] = float(np.percentile(np.asarray(times[k]) * 1e3,
                                        percentile))
  return rows


def trivial_call(x: jax.Array) -> Callable[[], jax.Array]:
  """The call floor: a trivial jitted function of device-resident `x`,
  blocking. Its time is the per-call cost no model change removes
  (dispatch, the transfer of nothing); not the memory bandwidth probe of
  rtjax.bench.breakdown."""
  trivial = jax.jit(lambda v: v + 1)
  return lambda: trivial(x).block_until_ready()


def call_floor_ms(batch: int, iters: int = 300, warmup: int = 20) -> float:
  """p50 of the call floor on a (batch, 1) input, timed alone."""
  x = jax.device_put(np.zeros((batch, 1), np.float32))
  times = time_calls({"floor": trivial_call(x)}, iters, warmup)
  return float(np.median(times["floor"]) * 1e3)


def host_overhead(model: CompiledModel, iters: int = 500,
                  warmup: int = 50) -> dict[str, float]:
  """p50 of three batch-1 paths, timed in turns: a trivial jitted call (the
  dispatch floor), the compiled model on a device-resident input, and the
  full request (numpy in, pad, run, trim, numpy out)."""
  images = np.zeros((1, *model.input_shape), model.input_dtype)
  bucket = model.bucket_for(1)
  on_device = jax.device_put(np.zeros((bucket, *model.input_shape),
                                      model.input_dtype), model.input_sharding)
  paths = {"trivial_jit": trivial_call(on_device),
           "device_call": lambda: model.run_bucket(on_device).block_until_ready(),
           "request": lambda: model(images)}
  times = time_calls(paths, iters, warmup)
  p50 = {name: float(np.median(t) * 1e6) for name, t in times.items()}
  return {f"{name}_p50_us": value for name, value in p50.items()} | {
      "request_overhead_us": p50["request"] - p50["device_call"]}


def streaming_latency(stream: StreamingModel, iters: int = 500,
                      warmup: int = 50) -> dict[str, float]:
  """Per time step of a stream, timed in turns: the full request (numpy
  chunk in, logits out, state carried) and the device call alone (a chunk
  already on the device); their p50 difference is the host's overhead."""
  chunk = np.zeros((stream.batch, stream.chunk, stream.features), np.float32)
  on_device = jax.device_put(chunk)
  times = time_calls(
      {"request": lambda: stream(chunk),
       "device_call": lambda: stream.run_device(on_device).block_until_ready()},
      iters, warmup)
  stream.reset()
  per_step = {name: np.asarray(t) / stream.chunk for name, t in times.items()}
  request = percentiles(per_step["request"], stream.batch)
  return {"step_p50_ms": request["p50_ms"], "step_p99_ms": request["p99_ms"],
          "device_step_p50_ms": float(np.median(per_step["device_call"]) * 1e3),
          "host_overhead_per_step_us": float(
              (np.median(per_step["request"])
               - np.median(per_step["device_call"])) * 1e6),
          "chunk": stream.chunk, "batch": stream.batch}
