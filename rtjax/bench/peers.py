"""Peers on the same weights, timed in turns with rtjax in one run: ONNX
Runtime on the jax2onnx export (the `onnx` extra) and PyTorch eager on
LeNet-5 (when torch is installed). Each peer's outputs are checked against
rtjax's before it is timed."""

from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np
from flax import nnx

from rtjax.bench.latency import percentiles
from rtjax.infer import CompiledModel
from rtjax.infer.export import export_onnx
from rtjax.timing import time_calls


def onnxruntime_peer(model: nnx.Module, input_shape) -> Callable | None:
  try:
    import onnxruntime
  except ImportError:
    return None
  with tempfile.TemporaryDirectory() as tmp:
    path = export_onnx(model, input_shape, f"{tmp}/model.onnx")
    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda x: session.run(None, {name: x})[0]


def torch_lenet5_peer(model: nnx.Module, spec: dict) -> Callable | None:
  """The same LeNet-5 in PyTorch eager, weights copied (NHWC -> NCHW)."""
  if spec["name"] != "lenet5":
    return None
  try:
    import torch
  except ImportError:
    return None
  c1, c2 = spec["args"]["conv_channels"]
  h1, h2 = spec["args"]["hidden"]
  in_ch = spec["args"]["input_shape"][-1]
  net = torch.nn.Sequential(
      torch.nn.Conv2d(in_ch, c1, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
      torch.nn.Conv2d(c1, c2, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
      torch.nn.Flatten(), torch.nn.Linear(model.fc1.kernel.shape[0], h1),
      torch.nn.ReLU(), torch.nn.Linear(h1, h2), torch.nn.ReLU(),
      torch.nn.Linear(h2, spec["args"]["num_classes"])).eval()
  tensor = lambda a: torch.from_numpy(np.array(a))  # a writable copy
  with torch.no_grad():
    for layer, conv in ((net[0], model.conv1), (net[3], model.conv2)):
      layer.weight.copy_(tensor(np.transpose(conv.kernel[...], (3, 2, 0, 1))))
      layer.bias.copy_(tensor(conv.bias[...]))
    # Flax flattens HWC, torch CHW: permute fc1's input rows to match.
    side = int(round((model.fc1.kernel.shape[0] / c2) ** 0.5))
    rows = np.arange(side * side * c2).reshape(side, side, c2).transpose(2, 0, 1)
    fc1 = np.asarray(model.fc1.kernel[...])[rows.ravel()]
    for layer, kernel, bias in ((net[7], fc1, model.fc1.bias[...]),
                                (net[9], model.fc2.kernel[...], model.fc2.bias[...]),
                                (net[11], model.head.kernel[...], model.head.bias[...])):
      layer.weight.copy_(tensor(np.asarray(kernel).T))
      layer.bias.copy_(tensor(bias))

  def run(x):
    with torch.inference_mode():
      return net(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)))).numpy()
  return run


def compare_peers(served: CompiledModel, model: nnx.Module, spec: dict,
                  batch: int, iters: int = 200, warmup: int = 20,
                  atol: float = 1e-4, block: int = 10, settle: int = 3) -> dict:
  """p50/p99 and throughput of rtjax and each available peer, and ratios."""
  shape = served.input_shape
  x = np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32)
  contenders = {"rtjax": served}
  for name, peer in (("onnxruntime", onnxruntime_peer(model, shape)),
                     ("torch_eager", torch_lenet5_peer(model, spec))):
    if peer is not None:
      np.testing.assert_allclose(peer(x), served(x), atol=atol,
                                 err_msg=f"{name} disagrees with rtjax")
      contenders[name] = peer
  # Contenders take turns by blocks of calls, each block's first `settle`
  # calls untimed: a runtime's worker threads keep spinning a while after
  # its call (ONNX Runtime's do by default) and would slow the next call of
  # whoever runs right after (one exploration run here: rtjax's batch 256
  # went from 10 to 15 ms when calls alternated one by one).
  times = time_calls({name: (lambda run: lambda: run(x))(run)
                      for name, run in contenders.items()},
                     iters, warmup, block=block, settle=settle)
  results = {name: percentiles(t, batch) for name, t in times.items()}
  for name, result in results.items():
    result["rtjax_p50_ratio"] = results["rtjax"]["p50_ms"] / result["p50_ms"]
    result["rtjax_throughput_ratio"] = (results["rtjax"]["throughput_per_s"]
                                        / result["throughput_per_s"])
  return results
