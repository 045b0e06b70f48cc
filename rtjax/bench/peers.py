"""Peers at their best on the same weights, timed in turns with rtjax in one
run: ONNX Runtime on the natural export of the model (its training-time
definition: MaxPool, BatchNorm for ORT to fuse; rtjax.infer.export) with
graph optimisations on and the fastest of the thread settings tried here,
and PyTorch eager and torch.compile on idiomatic twins
(rtjax.bench.torch_twins) where torch is installed.

Every contender gets the same boundary: a host array in its natural layout
(NCHW for the ONNX Runtime and PyTorch image models, NHWC for rtjax),
prepared before timing, and a host array of logits out. Each peer's outputs
must agree with rtjax's within `atol` before anything is timed. A peer that
cannot be built (an exporter that fails, a family with no twin) becomes a
one-line note instead of a row.
"""

from __future__ import annotations

import itertools
import os
from typing import Callable

import numpy as np
from flax import nnx

from rtjax.bench import torch_twins
from rtjax.bench.latency import percentiles
from rtjax.errors import FlagError
from rtjax.infer import CompiledModel
from rtjax.timing import time_calls

# ONNX Runtime thread settings tried per model and batch (the fastest is
# timed): intra-op threads x whether idle workers spin.
ORT_THREADS = (1, os.cpu_count() or 1)
ORT_SPINNING = (True, False)
# PyTorch's intra-op threads tried (OpenMP workers; process-wide).
TORCH_THREADS = (1, os.cpu_count() or 1)
# Untimed seconds before each contender's block of timed calls. Spinning
# workers slow the next contender for tens of milliseconds (one-off probe,
# LeNet-5 at batch 256 in turns with ONNX Runtime's 2 spinning threads:
# rtjax's p50 3.75 ms after 3 untimed calls, 8 ms; 3.01 after 10; 2.62
# after 30, 80 ms; 2.77 in experiments.bench's own table, rtjax only).
SETTLE_S = 0.1


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _image(input_shape) -> bool:
  return len(input_shape) == 3


def natural_input(x: np.ndarray) -> np.ndarray:
  """NHWC images as NCHW (what ONNX's Conv and PyTorch take), contiguous."""
  return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))) if x.ndim == 4 else x


def onnxruntime_session(proto, threads: int, spinning: bool):
  import onnxruntime
  options = onnxruntime.SessionOptions()
  options.graph_optimization_level = (
      onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)
  options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.add_session_config_entry("session.intra_op.allow_spinning",
                                   "1" if spinning else "0")
  options.log_severity_level = 3  # shape-merge warnings of jax2onnx graphs
  session = onnxruntime.InferenceSession(
      proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda x: session.run(None, {name: x})[0]


def onnxruntime_best(proto, x: np.ndarray, check: Callable[[np.ndarray], None],
                     trial_calls: int = 20
                     ) -> tuple[str, Callable, dict[str, float]]:
  """The fastest thread setting on `x` (median of calls in turns): its
  label, its call and every setting's median seconds. `check` sees each
  setting's outputs before anything is timed."""
  runs = {f"{threads} thread{'s' * (threads > 1)}, "
          f"{'spinning' if spin else 'no spinning'}":
          onnxruntime_session(proto, threads, spin)
          for threads, spin in itertools.product(ORT_THREADS, ORT_SPINNING)}
  for run in runs.values():
    check(run(x))
  times = time_calls({label: (lambda r: lambda: r(x))(run)
                      for label, run in runs.items()}, trial_calls,
                     warmup=3, block=5, settle=2, settle_s=SETTLE_S)
  medians = {label: float(np.median(t)) for label, t in times.items()}
  best = min(medians, key=medians.get)
  return best, runs[best], medians


def torch_runs(model: nnx.Module, spec: dict, x: np.ndarray,
               check: Callable[[np.ndarray], None], compile_: bool = True,
               device: str = "cpu", trial_calls: int = 20
               ) -> tuple[dict[str, Callable], dict]:
  """({'torch eager': call, 'torch.compile': call} on host arrays (NCHW),
  details); empty without torch or without a twin of the family. On the
  CPU, torch's intra-op thread count (process-wide) is set to the fastest
  of those tried for eager calls on `x`."""
  try:
    import torch
  except ImportError:
    return {}, {}
  net = torch_twins.twin(model, spec)
  if net is None:
    return {}, {}
  net = net.to(device)

  def host(module):
    def run(x):
      with torch.inference_mode():
        return module(torch.from_numpy(x).to(device)).cpu().numpy()
    return run
  eager, details = host(net), {}
  check(eager(x))  # before the thread trials time it
  if device == "cpu":
    medians = {}
    for threads in TORCH_THREADS:
      torch.set_num_threads(threads)
      times = time_calls({"eager": lambda: eager(x)}, trial_calls, warmup=3)
      medians[f"{threads} thread{'s' * (threads > 1)}"] = float(
          np.median(times["eager"]))
    best = min(medians, key=medians.get)
    torch.set_num_threads(int(best.split()[0]))
    details = {"setting": best, "trials_s": medians}
  runs = {"torch eager": eager}
  if compile_:
    runs["torch.compile"] = host(torch.compile(net, dynamic=False))
  return runs, {name: details for name in runs}


def peer_runs(model: nnx.Module, spec: dict, batch: int, x: np.ndarray,
              check: Callable[[str], Callable[[np.ndarray], None]],
              rtjax_graph: bool = False, torch_compile: bool = True,
              torch_device: str = "cpu") -> tuple[dict, dict, list[str]]:
  """({peer name: call on natural-layout inputs}, details, notes);
  `check(name)` is applied to every output a peer gives before it is timed,
  thread-setting trials included."""
  from rtjax.infer.export import onnx_proto  # jax2onnx: peers only
  shape = spec["args"]["input_shape"]
  runs, details, notes = {}, {}, []
  try:
    import onnxruntime  # noqa: F401
  except ImportError:
    notes.append("ONNX Runtime not installed (pip install 'rtjax[onnx]')")
  else:
    natural = x if not _image(shape) else natural_input(x)
    try:
      proto = onnx_proto(model, shape, batch, natural=True,
                         channels_first=_image(shape))
      label, run, trials = onnxruntime_best(proto, natural,
                                            check("onnxruntime"))
      runs["onnxruntime"] = run
      details["onnxruntime"] = {"setting": label, "trials_s": trials,
                                "graph": "natural export"}
      if rtjax_graph:
        graph_label, runs["onnxruntime, rtjax's graph"], graph_trials = (
            onnxruntime_best(onnx_proto(model, shape, batch), x,
                             check("onnxruntime, rtjax's graph")))
        details["onnxruntime, rtjax's graph"] = {
            "setting": graph_label, "trials_s": graph_trials,
            "graph": "rtjax's serving graph (NHWC)"}
    except AssertionError:  # a peer computing something else: never a note
      raise
    except Exception as e:  # an exporter's failure is a note, not a crash
      notes.append(f"ONNX Runtime: jax2onnx could not export "
                   f"{spec['name']}: {_first_line(e)}")
  torch, torch_details = torch_runs(
      model, spec, x if not _image(shape) else natural_input(x),
      check("torch eager"), torch_compile, torch_device)
  details.update(torch_details)
  if not torch:
    notes.append("PyTorch: " + ("no twin of this family" if _has_torch()
                                else "not installed (pip install torch)"))
  runs.update(torch)
  return runs, details, notes


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def compare_peers(served: CompiledModel, model: nnx.Module, spec: dict,
                  batch: int, iters: int = 200, warmup: int = 20,
                  atol: float = 1e-4, block: int = 10, settle: int = 3,
                  rtjax_graph: bool = False, torch_compile: bool = True,
                  torch_device: str = "cpu") -> dict:
  """{"contenders": {name: p50/p99, throughput, rtjax's ratios to it},
  "details": per peer, "notes": peers that could not run}."""
  if served.options["dtype"] != "float32":
    raise FlagError(f"peers run float32 models; rtjax serves this one in "
                    f"{served.options['dtype']}: drop --dtype to compare")
  shape = served.input_shape
  x = np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)
  reference = served(x)

  def check(name):
    return lambda out: np.testing.assert_allclose(
        out, reference, atol=atol, err_msg=f"{name} disagrees with rtjax")
  runs, details, notes = peer_runs(model, spec, batch, x, check, rtjax_graph,
                                   torch_compile, torch_device)
  inputs = {name: x if "rtjax's graph" in name or not _image(shape)
            else natural_input(x) for name in runs}
  for name, run in runs.items():  # torch.compile's first call is here
    check(name)(run(inputs[name]))
  calls = {"rtjax": lambda: served(x)}
  calls.update({name: (lambda r, v: lambda: r(v))(run, inputs[name])
                for name, run in runs.items()})
  # Contenders take turns by blocks of calls, each block after untimed
  # calls (`settle` and SETTLE_S): a runtime's worker threads keep spinning
  # after its call (ONNX Runtime's do by default) and slow whoever runs next.
  times = time_calls(calls, iters, warmup, block=block, settle=settle,
                     settle_s=SETTLE_S)
  results = {name: percentiles(t, batch) for name, t in times.items()}
  for result in results.values():
    result["rtjax_p50_ratio"] = results["rtjax"]["p50_ms"] / result["p50_ms"]
    result["rtjax_p99_ratio"] = results["rtjax"]["p99_ms"] / result["p99_ms"]
    result["rtjax_throughput_ratio"] = (results["rtjax"]["throughput_per_s"]
                                        / result["throughput_per_s"])
  return {"contenders": results, "details": details, "notes": notes}
