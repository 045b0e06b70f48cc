"""Serving: BatchNorm folding, buckets and padding, meshes on 8 simulated
devices, 2 real processes, exported artifacts, compilation cache, bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rtjax import models
from rtjax.data import load_dataset
from rtjax.infer import CompiledModel, fold_batchnorm, make_mesh, parse_mesh
from rtjax.checkpoint import (CheckpointError, checkpoint_dataset,
                              load_checkpoint)
from rtjax.errors import FlagError, InputError
from tests.conftest import REPO, free_port, run_module


def images(n, shape=(8, 8, 1), seed=0):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_folded_batchnorm_matches_inference_and_leaves_no_norm():
  from flax import nnx
  model = models.create_model("resnet", {"num_classes": 10,
                                         "input_shape": (8, 8, 1)})
  for seed in range(3):  # move the running statistics away from (0, 1)
    models.training_view(model)(images(16, seed=seed) * 3 + 1)
  folded = fold_batchnorm(model)
  assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(folded))
  x = images(16, seed=9)
  np.testing.assert_allclose(folded(x), models.inference_view(model)(x),
                             atol=1e-5)
  # The original model is untouched and still trainable.
  assert any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model))


def test_from_checkpoint_reproduces_recorded_accuracy(trained):
  config, workdir, result = trained
  served = CompiledModel.from_checkpoint(workdir, batch_sizes=(1, 64, 256))
  test = load_dataset(config.data, config.seed).test
  accuracy = np.mean(np.argmax(served(test.images), -1) == test.labels)
  assert accuracy == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-9)
  assert set(served.compile_seconds) == {1, 64, 256}
  assert all(t > 0 for t in served.compile_seconds.values())


def test_padding_to_buckets_never_changes_real_rows(trained):
  served = CompiledModel.from_checkpoint(trained[1], batch_sizes=(4, 8))
  x = images(20)
  for n in (1, 3, 4, 5, 7, 8):
    bucket = served.bucket_for(n)
    assert bucket == (4 if n <= 4 else 8)
    # Same executable, zero padding vs real rows behind: bit-identical rows.
    np.testing.assert_array_equal(served(x[:n]), served(x[:bucket])[:n])
  # Across buckets only the float summation order may differ.
  np.testing.assert_allclose(served(x[:3]), served(x[:8])[:3], atol=1e-5)
  # More rows than the largest bucket: several calls, not an error.
  np.testing.assert_array_equal(served(x)[:16], np.concatenate(
      [served(x[:8]), served(x[8:16])]))
  np.testing.assert_array_equal(served(x)[16:], served(x[16:]))
  assert served(x[:0]).shape[0] == 0


@pytest.mark.slow
def test_compiles_from_abstract_weights_and_places_them_apart(monkeypatch):
  """Compiling needs shapes, dtypes and shardings alone: a model made by
  nnx.eval_shape compiles with nothing put on a device; placing the values
  afterwards serves exactly what compiling and placing together serve."""
  import jax
  from flax import nnx
  args = {"num_classes": 10, "input_shape": (8, 8, 1)}
  model = models.create_model("resnet", args, seed=3)
  abstract = nnx.eval_shape(lambda: models.create_model("resnet", args))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct)
             for leaf in jax.tree.leaves(nnx.state(abstract)))
  x = images(8)
  expected = CompiledModel(model, (8, 8, 1), batch_sizes=(4, 8))(x)
  placed, device_put = [], jax.device_put
  monkeypatch.setattr(jax, "device_put", lambda *a, **k: (
      placed.append(a), device_put(*a, **k))[1])
  served = CompiledModel(abstract, (8, 8, 1), batch_sizes=(4, 8), place=False)
  assert set(served.executables) == {4, 8} and not placed
  assert served.states == {}
  with pytest.raises(FlagError, match="shapes, not values"):
    served.place()
  narrow = models.create_model("resnet", {**args, "stem_width": 8})
  with pytest.raises(FlagError, match="not those compiled for"):
    served.place(narrow)
  served.place(model)
  assert placed
  np.testing.assert_array_equal(served(x), expected)
  np.testing.assert_array_equal(served(x[:3]), expected[:3])


@pytest.mark.slow
def test_meshes_on_8_devices_match_single_device_float_and_int8(
    family_checkpoints):
  paths = [str(p) for p in family_checkpoints.values()]
  result = run_module("tests.sharded_inference", *paths, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(report) == 2 * len(paths)  # float and int8 of each family
  # Every float model with a conv (the ViT's patch embedding is one).
  conv_floats = {f"{family_checkpoints[f]}:float"
                 for f in ("lenet5", "resnet", "vit")}
  for key, meshes in report.items():
    for mesh, numbers in meshes.items():
      assert numbers["shape"] == [24, 10]
      if key.endswith("vit0:int8"):
        # The ViT's int8 activations are quantized per example at run time:
        # a 1e-7 change in a float sum (another XLA partitioning) can move a
        # value across an int8 rounding boundary, one quantization step
        # (~2e-2 in the logits of this briefly trained ViT).
        assert numbers["max_abs_diff"] <= 5e-2, (key, mesh, numbers)
      else:
        assert numbers["same_top1"], (key, mesh, numbers)
        assert numbers["max_abs_diff"] <= 1e-5, (key, mesh, numbers)
    # Tensor parallelism really splits weights: XLA had to add collectives.
    assert meshes["tensor_parallel"]["collectives"] > 0
    assert meshes["data_parallel"]["collectives"] == 0
    assert ("banded_embedded" in meshes) == (key in conv_floats)


@pytest.mark.slow
def test_two_processes_agree_with_one(family_checkpoints, tmp_path):
  # The ViT: tensor parallelism splits its heads and MLP over both
  # processes, and "auto" has one lowering to time (its patch embedding; the
  # ResNet's convs give dozens, each call rounds of gloo collectives).
  workdir = str(family_checkpoints["vit"])
  # One process: this one (one device), on the split predict reads.
  served = CompiledModel.from_checkpoint(workdir, batch_sizes=(8,))
  single = served(checkpoint_dataset(served.metadata).test.images)
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.predict", f"--checkpoint={workdir}",
       f"--output={tmp_path / f'multi{i}'}", "--mesh=data:2,model:2",
       # Each process times the lowerings; all must follow process 0's
       # timings, or their programs differ and the collectives hang.
       "--conv_lowering=auto", "--batch_sizes=8",
       f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env={**__import__("os").environ, "JAX_NUM_CPU_DEVICES": "2"})
      for i in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert not (tmp_path / "multi1").exists()  # only process 0 writes
  results = json.loads((tmp_path / "multi0" / "results.json").read_text())
  assert results["processes"] == 2 and results["mesh"] == {"data": 2, "model": 2}
  assert list(results["conv_lowering"]) == ["8"]  # e.g. "xla" or "conv1:2x2"
  np.testing.assert_allclose(np.load(tmp_path / "multi0" / "logits.npy"),
                             single, atol=1e-5)


@pytest.mark.slow
def test_exported_artifact_runs_without_rtjax(trained, tmp_path):
  workdir = trained[1]
  result = run_module("experiments.export", f"--checkpoint={workdir}",
                      f"--out={tmp_path / 'model.jax'}")
  assert result.returncode == 0, result.stderr[-3000:]
  manifest = json.loads((tmp_path / "model.jax.json").read_text())
  assert manifest["input_shape"] == [8, 8, 1]
  assert manifest["metadata"]["model"]["name"] == "resnet"
  x = images(5)
  np.save(tmp_path / "x.npy", x)
  code = f"""
import sys, numpy as np, jax
run = jax.export.deserialize(bytearray(open({str(tmp_path / 'model.jax')!r}, 'rb').read())).call
np.save({str(tmp_path / 'y.npy')!r}, np.asarray(run(np.load({str(tmp_path / 'x.npy')!r}))))
assert not any(m.startswith(('rtjax', 'flax')) for m in sys.modules), 'model code loaded'
"""
  fresh = subprocess.run([sys.executable, "-c", code], cwd="/", text=True,
                         capture_output=True, timeout=120)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  live = CompiledModel.from_checkpoint(workdir, batch_sizes=(8,))(x)
  # Weights as constants let XLA fold them differently: float32 rounding.
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), live, rtol=1e-6,
                             atol=1e-5)


@pytest.mark.slow
def test_compilation_cache_is_hit_by_a_second_process(trained, tmp_path):
  args = [f"--checkpoint={trained[1]}", f"--output={tmp_path}",
          f"--compilation_cache_dir={tmp_path / 'cache'}", "--batch_sizes=8,64"]
  counts = []
  for _ in range(2):
    result = run_module("experiments.predict", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    counts.append(json.loads(result.stdout.strip().splitlines()[-1])
                  ["compilation_cache"])
  assert counts[0]["cache_misses"] >= 2 and counts[0]["cache_hits"] == 0
  assert counts[1]["cache_hits"] >= 2 and counts[1]["cache_misses"] == 0


def test_bad_input_gets_clear_errors(trained, tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    CompiledModel.from_checkpoint(tmp_path / "missing")
  half = tmp_path / "checkpoints" / "150.orbax-checkpoint-tmp-99"
  shutil.copytree(trained[1] / "checkpoints" / "150", half)
  with pytest.raises(CheckpointError, match="half-written"):
    CompiledModel.from_checkpoint(half)
  with pytest.raises(FlagError, match=r"needs 6 devices but 1 are available"):
    make_mesh({"data": 3, "model": 2})
  with pytest.raises(FlagError, match="bad mesh axis 'rows:2'"):
    parse_mesh("rows:2")
  model, _ = load_checkpoint(trained[1])
  served = CompiledModel(model, (8, 8, 1), batch_sizes=(4,))
  with pytest.raises(InputError, match=r"compiled for \(8, 8, 1\)"):
    served(images(2, shape=(8, 8, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lenet5", "resnet", "vit"])
def test_onnx_export_matches_within_1e4(family_checkpoints, tmp_path, family):
  pytest.importorskip("jax2onnx", reason="ONNX export is the rtjax[onnx] extra")
  import onnxruntime
  path = family_checkpoints[family]
  result = run_module("experiments.export", f"--checkpoint={path}",
                      "--format=onnx", f"--out={tmp_path / 'model.onnx'}")
  assert result.returncode == 0, result.stderr[-3000:]
  model, metadata = load_checkpoint(path)
  shape = metadata["model"]["args"]["input_shape"]
  x = images(7, shape=shape)
  session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"),
                                         providers=["CPUExecutionProvider"])
  out = session.run(None, {session.get_inputs()[0].name: x})[0]
  live = CompiledModel(model, shape, batch_sizes=(8,))(x)
  np.testing.assert_allclose(out, live, atol=1e-4)


def test_rounded_widths_serve_the_same_outputs(untrained_checkpoints):
  for family in ("lenet5", "vit"):
    path = untrained_checkpoints[family]
    plain = CompiledModel.from_checkpoint(path, batch_sizes=(8,))
    wide = CompiledModel.from_checkpoint(path, batch_sizes=(8,),
                                         round_widths_to=8)
    x = images(8, shape=plain.input_shape)
    np.testing.assert_allclose(wide(x), plain(x), atol=1e-5)
  assert "f32[5,5,3,8]" in CompiledModel.from_checkpoint(
      untrained_checkpoints["lenet5"], batch_sizes=(8,),
      round_widths_to=8).executables[8].as_text()  # 6 filters became 8
