"""Peers at their best: the natural ONNX export (max pools as MaxPool),
PyTorch twins that compute what rtjax computes, and the peer table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtjax.infer import CompiledModel, fold_batchnorm
from rtjax.infer.natural import find_pools, natural
from rtjax.models import create_model
from rtjax.models.lenet import max_pool_2x2

LENET = {"num_classes": 10, "input_shape": [32, 32, 3],
         "conv_channels": [4, 8], "hidden": [16, 16]}


def test_strided_slice_max_pools_are_found_and_replaced():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)),
                  jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v: max_pool_2x2(v) + 1)(x).jaxpr
  ((source, k),) = find_pools(jaxpr).values()
  assert k == 2 and source is jaxpr.invars[0]
  # Not a pool: the max of two of the four slices.
  half = lambda v: jnp.maximum(v[:, 0:8:2, 0::2], v[:, 1:8:2, 1::2])
  assert not find_pools(jax.make_jaxpr(half)(x).jaxpr)
  pooled = natural(lambda v: max_pool_2x2(v) + 1)
  np.testing.assert_array_equal(pooled(x), max_pool_2x2(x) + 1)
  assert "reduce_window_max" in str(jax.make_jaxpr(pooled)(x))


@pytest.mark.slow
def test_natural_onnx_export_has_maxpool_and_agrees():
  pytest.importorskip("jax2onnx", reason="needs the rtjax[onnx] extra")
  ort = pytest.importorskip("onnxruntime", reason="needs the rtjax[onnx] extra")
  from rtjax.bench.peers import natural_input, onnxruntime_session
  from rtjax.infer.export import onnx_proto
  model = create_model("lenet5", LENET)
  del ort
  ops = lambda proto: {n.op_type for n in proto.graph.node}
  natural_graph = onnx_proto(model, LENET["input_shape"], 2, natural=True,
                             channels_first=True)
  assert "MaxPool" in ops(natural_graph) and "Slice" not in ops(natural_graph)
  assert "MaxPool" not in ops(onnx_proto(model, LENET["input_shape"], 2))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  run = onnxruntime_session(natural_graph, threads=1, spinning=False)
  np.testing.assert_allclose(run(natural_input(x)), fold_batchnorm(model)(x),
                             atol=1e-4)


TWINS = {"lenet5": LENET,
         "resnet": {"num_classes": 10, "input_shape": [8, 8, 1],
                    "stem_width": 8, "stage_widths": [8, 16]},
         "vit": {"num_classes": 10, "input_shape": [8, 8, 1], "embed_dim": 16,
                 "depth": 1, "num_heads": 2, "head_dim": 8, "mlp_dim": 16}}


@pytest.mark.parametrize("family", sorted(TWINS))
def test_torch_twins_compute_what_rtjax_computes(family):
  torch = pytest.importorskip("torch", reason="PyTorch peer: pip install torch")
  from rtjax.bench import torch_twins
  from rtjax.bench.peers import natural_input
  args = TWINS[family]
  model = create_model(family, args, seed=1)
  if family == "resnet":  # BatchNorm with statistics to fuse
    for bn in (model.stem_bn, model.blocks[1].conv1_bn):
      bn.mean[...] = jnp.full(bn.mean.shape, 0.3)
      bn.var[...] = jnp.full(bn.var.shape, 2.0)
  net = torch_twins.twin(model, {"name": family, "args": args})
  x = np.random.default_rng(0).normal(size=(3, *args["input_shape"])).astype(
      np.float32)
  with torch.inference_mode():
    out = net(torch.from_numpy(natural_input(x))).numpy()
  np.testing.assert_allclose(out, fold_batchnorm(model)(x), atol=1e-4)
  assert torch_twins.twin(model, {"name": "gru", "args": args}) is None


@pytest.mark.slow
def test_peers_agree_and_are_timed_in_one_run(monkeypatch):
  pytest.importorskip("onnxruntime", reason="peers need the rtjax[onnx] extra")
  pytest.importorskip("jax2onnx", reason="peers need the rtjax[onnx] extra")
  from rtjax.bench import peers, report
  model = create_model("lenet5", LENET)
  spec = {"name": "lenet5", "args": LENET}
  served = CompiledModel(model, LENET["input_shape"], batch_sizes=(4,),
                         spec=spec)
  result = peers.compare_peers(served, model, spec, 4, iters=10, warmup=2,
                               rtjax_graph=True, torch_compile=False)
  contenders = result["contenders"]
  # Every peer's outputs matched rtjax's within 1e-4 before it was timed.
  assert {"rtjax", "onnxruntime", "onnxruntime, rtjax's graph"} <= set(
      contenders)
  for r in contenders.values():
    assert r["p50_ms"] > 0 and r["calls"] == 10  # one block each, in turns
  assert contenders["rtjax"]["rtjax_p50_ratio"] == 1.0
  setting = result["details"]["onnxruntime"]["setting"]
  assert setting in result["details"]["onnxruntime"]["trials_s"]
  assert len(result["details"]["onnxruntime"]["trials_s"]) == len(
      peers.ORT_THREADS) * len(peers.ORT_SPINNING)
  table = report.peers_markdown({"lenet": {"model": "lenet5", "serving":
                                           report.serving_summary(served),
                                           4: result}})
  assert "| lenet5 | 4 | onnxruntime |" in table and setting in table
  # An exporter's failure is a one-line note, not a traceback.
  from rtjax.infer import export

  def fails(*args, **kwargs):
    raise NotImplementedError("no plugin for primitive 'x'\n  traceback...")
  monkeypatch.setattr(export, "onnx_proto", fails)
  runs, _, notes = peers.peer_runs(model, {"name": "other", "args": LENET}, 4,
                                   np.zeros((4, 32, 32, 3), np.float32),
                                   check=lambda name: lambda out: None)
  assert not runs and notes[0] == (
      "ONNX Runtime: jax2onnx could not export other: NotImplementedError: "
      "no plugin for primitive 'x'")
  from importlib.util import find_spec
  assert notes[1] == ("PyTorch: no twin of this family" if find_spec("torch")
                      else "PyTorch: not installed (pip install torch)")


@pytest.mark.slow
def test_a_disagreeing_peer_fails_before_anything_is_timed(monkeypatch):
  """Even the thread-setting trials run only after the outputs matched."""
  pytest.importorskip("onnxruntime", reason="peers need the rtjax[onnx] extra")
  pytest.importorskip("jax2onnx", reason="peers need the rtjax[onnx] extra")
  from rtjax.bench import peers
  model = create_model("lenet5", LENET)
  spec = {"name": "lenet5", "args": LENET}
  served = CompiledModel(model, LENET["input_shape"], batch_sizes=(4,),
                         spec=spec)
  monkeypatch.setattr(peers, "onnxruntime_session",
                      lambda proto, threads, spinning: lambda x: np.zeros(
                          (len(x), 10), np.float32))
  timed = []
  monkeypatch.setattr(peers, "time_calls",
                      lambda *args, **kwargs: timed.append(args))
  with pytest.raises(AssertionError, match="onnxruntime disagrees"):
    peers.compare_peers(served, model, spec, 4, iters=3, warmup=1,
                        torch_compile=False)
  assert not timed
