"""Compression: pruning schedules and masks, structured shrink, distillation,
qwix quantization, and the whole pipeline (lineage, skip, resume)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rtjax import models
from rtjax.checkpoint import load_checkpoint
from rtjax.compress import pruning, quantize, structured
from rtjax.errors import ConfigError
from rtjax.models import quantized
from tests.conftest import built_once


def lenet():
  return models.create_model("lenet5", {"num_classes": 10,
                                        "input_shape": (32, 32, 3)})


def test_polynomial_schedule_values():
  s = lambda t: float(pruning.polynomial_sparsity(t, 0.1, 0.8, 100, 500))
  assert s(0) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
  assert s(300) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - 0.5) ** 3)
  assert s(500) == pytest.approx(0.8) and s(900) == pytest.approx(0.8)
  values = [s(t) for t in range(100, 501, 50)]
  assert values == sorted(values)  # monotone, fast early, slow late


@pytest.mark.slow
def test_global_magnitude_masks_keep_the_largest_weights():
  params = nnx.state(lenet(), nnx.Param)
  prunable = pruning.prunable_tree(params, exclude="head")
  masks = pruning.magnitude_masks(params, prunable, 0.8)
  kept, dropped = [], []
  for p, w, m in zip(*(jax.tree.leaves(t) for t in (prunable, params, masks))):
    if p:
      kept.append(np.abs(w[m])), dropped.append(np.abs(w[~m]))
    else:
      assert np.all(m)  # biases and the excluded head are untouched
  total = sum(k.size + d.size for k, d in zip(kept, dropped))
  assert sum(d.size for d in dropped) / total == pytest.approx(0.8, abs=1e-3)
  assert min(k.min() for k in kept) >= max(d.max() for d in dropped)


def test_per_layer_masks_hit_every_layer():
  params = nnx.state(lenet(), nnx.Param)
  prunable = pruning.prunable_tree(params)
  masked = jax.tree.map(lambda w, m: w * m, params,
                        pruning.magnitude_masks(params, prunable, 0.5, "layer"))
  report = pruning.sparsity_report(masked, prunable)
  assert all(v == pytest.approx(0.5, abs=0.01) for v in report["layers"].values())


def test_n_m_masks():
  params = nnx.state(lenet(), nnx.Param)
  prunable = pruning.prunable_tree(params, include="fc", exclude="")
  masks = pruning.n_m_masks(params, prunable, 2, 4)
  fc1 = np.asarray(masks["fc1"]["kernel"][...])
  groups = fc1.reshape(100, 4, 120)  # 400 inputs in groups of 4, per output
  assert np.all(groups.sum(axis=1) == 2)
  weights = np.abs(np.asarray(params["fc1"]["kernel"][...])).reshape(100, 4, 120)
  assert np.all(np.where(groups, weights, np.inf).min(1)
                >= np.where(groups, -np.inf, weights).max(1))
  with pytest.raises(ValueError, match="multiple of 4; exclude it"):
    pruning.n_m_masks(params, pruning.prunable_tree(params), 2, 4)


@pytest.mark.parametrize("make_tx", [lambda: optax.adamw(1e-2),
                                     lambda: optax.sgd(0.1, momentum=0.9)])
def test_pruned_weights_stay_exactly_zero(make_tx):
  params = nnx.state(lenet(), nnx.Param)
  prunable_fn = lambda p: pruning.prunable_tree(p, exclude="head")
  mask_fn = lambda p, pr, step: pruning.magnitude_masks(
      p, pr, pruning.polynomial_sparsity(step, 0.0, 0.7, 2, 8))
  tx = pruning.pruned(make_tx(), prunable_fn, mask_fn, 2, 2, 8)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda w: jax.random.normal(key, w.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  zeros_seen = None
  for i in range(14):
    params, state = step(params, state, jax.random.key(i))
    zeros = [np.asarray(w) == 0 for w in jax.tree.leaves(params)]
    if i + 1 > 8:  # masks fixed after end_step: the same weights stay zero
      if zeros_seen is not None:
        assert all(np.array_equal(a, b) for a, b in zip(zeros, zeros_seen))
      zeros_seen = zeros
  report = pruning.sparsity_report(params, prunable_fn(params))
  assert report["global"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("name,args,shape,flops_ratio", [
    ("lenet5", {"conv_channels": [6, 16], "hidden": [120, 84]}, (32, 32, 3), 0.5),
    pytest.param("resnet", {"stem_width": 8, "stage_widths": [8, 16],
                            "blocks_per_stage": [2, 1], "stage_strides": [1, 2]},
                 (8, 8, 1), 0.5, marks=pytest.mark.slow),
    # The ViT's embedding width (residual stream) is kept: heads and MLP go.
    ("vit", {"embed_dim": 16, "depth": 2, "num_heads": 4, "head_dim": 4,
             "mlp_dim": 32}, (8, 8, 1), 0.6)])
def test_structured_shrink(name, args, shape, flops_ratio):
  args = {**args, "num_classes": 10, "input_shape": list(shape)}
  model = models.create_model(name, args)
  x = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
  if name == "resnet":
    models.training_view(model)(x * 2 + 1)  # non-trivial BatchNorm stats
  reference = np.asarray(models.inference_view(model)(x))
  full_flops = models.forward_flops(model, shape)
  for criterion in ("l1", "l2") + (("bn_scale",) if name == "resnet" else ()):
    same, same_args, _ = structured.shrink(model, name, args, 1.0, criterion)
    np.testing.assert_array_equal(models.inference_view(same)(x), reference)
    small, small_args, summary = structured.shrink(model, name, args, 0.5,
                                                   criterion)
    assert small(x).shape == (4, 10)
    assert all(g["kept"] == -(-g["width"] // 2) for g in summary.values())
    assert models.forward_flops(small, shape) < flops_ratio * full_flops
    # The emitted arguments rebuild the same smaller model.
    rebuilt = models.create_model(name, small_args)
    assert models.param_count(rebuilt) == models.param_count(small)


def test_structured_removes_the_least_important_units():
  model = lenet()
  kernel = np.asarray(model.conv1.kernel[...]).copy()
  kernel[..., [1, 4]] *= 1e-3  # two nearly dead filters
  model.conv1.kernel[...] = kernel
  args = {"num_classes": 10, "input_shape": [32, 32, 3],
          "conv_channels": [6, 16], "hidden": [120, 84]}
  small, small_args, _ = structured.shrink(model, "lenet5", args, 4 / 6,
                                           groups="conv1")
  assert small_args["conv_channels"] == [4, 16]
  np.testing.assert_array_equal(small.conv1.kernel[...], kernel[..., [0, 2, 3, 5]])
  np.testing.assert_array_equal(small.conv2.kernel[...],
                                np.asarray(model.conv2.kernel[...])[:, :, [0, 2, 3, 5]])


def test_rounding_of_kept_widths():
  assert structured.kept_count(120, 0.5, 8) == 64
  assert structured.kept_count(6, 0.5, 8) == 6  # never above the width
  assert structured.kept_count(8, 0.5, 128, unit=16) == 8  # heads of 16
  assert structured.kept_count(32, 0.3, 1) == 10


@pytest.mark.slow
def test_int8_conversion_round_trip(trained, tmp_path):
  model, metadata = load_checkpoint(trained[1])
  shape = metadata["model"]["args"]["input_shape"]
  spec = quantized.quantization_spec("w8a8", mode="ptq")
  int8 = quantize.int8_model(model, spec, shape)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(int8)))
  qvalues = [leaf for path, leaf in leaves if "qvalue" in jax.tree_util.keystr(path)]
  assert qvalues and all(q.dtype == jnp.int8 for q in qvalues)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, *shape)),
                  jnp.float32)
  float_out = np.asarray(models.inference_view(model)(x))
  int8_out = np.asarray(models.inference_view(int8)(x))
  assert np.mean(np.argmax(float_out, -1) == np.argmax(int8_out, -1)) >= 0.9
  assert np.abs(float_out - int8_out).max() > 0  # really quantized
  with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'"):
    quantized.quantization_spec("int3")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  def build():
    from configs import compress
    from rtjax.pipeline import run_pipeline
    config = compress.get_config("tiny")
    workdir = tmp_path_factory.mktemp("compress")
    return config, workdir, run_pipeline(config, workdir)
  return built_once(tmp_path_factory, "pipeline_run", build)


@pytest.mark.slow
def test_pipeline_lineage_and_reports(pipeline_run):
  config, workdir, results = pipeline_run
  assert list(results) == list(config.stages)
  for name in config.stages:
    model, meta = load_checkpoint(workdir / name)
    assert meta["stage"] == name and meta["complete"]
    report = json.loads((workdir / name / "report.json").read_text())
    assert report["metrics"]["test"]["accuracy"] > 0.1
    parent = config.stage[name].parent
    assert meta["parent"] == (str(workdir / parent) if parent else None)
  structured_meta = load_checkpoint(workdir / "structured")[1]
  assert structured_meta["model"]["args"]["stem_width"] == 8  # half of 16
  assert (structured_meta["done"]["flops_after"]
          < 0.5 * structured_meta["done"]["flops_before"])
  sparse = json.loads((workdir / "sparse" / "report.json").read_text())
  prunable = {k: v for k, v in sparse["layers"].items()
              if k.startswith("blocks/")}
  zeros = sum(v["zeros"] for v in prunable.values())
  total = sum(v["params"] for v in prunable.values())
  assert zeros / total == pytest.approx(0.8, abs=0.005)
  assert sparse["layers"]["head"]["zeros"] == 0  # excluded


@pytest.mark.slow
def test_student_checkpoint_holds_no_teacher(pipeline_run):
  import orbax.checkpoint as ocp
  _, workdir, _ = pipeline_run
  student, meta = load_checkpoint(workdir / "student")
  assert meta["stage_type"] == "distill" and meta["done"]["alpha"] == 0.7
  assert meta["model"]["args"]["stage_widths"] == [16, 28]
  manager = ocp.CheckpointManager(workdir / "student" / "checkpoints",
                                  item_names=("model",))
  saved = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      model=ocp.args.StandardRestore())).model
  flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator="/"):
                       np.shape(x)
                       for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  assert flat(saved) == flat(nnx.to_pure_dict(nnx.state(student)))


@pytest.mark.slow
def test_int8_stage_holds_int8_and_matches_qat(pipeline_run):
  _, workdir, results = pipeline_run
  int8, meta = load_checkpoint(workdir / "int8")
  assert meta["model"]["quantization"]["mode"] == "ptq"
  dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(int8)))}
  assert "int8" in dtypes
  assert abs(results["int8"].metrics["test"]["accuracy"]
             - results["qat"].metrics["test"]["accuracy"]) <= 0.002
  report = json.loads((workdir / "int8" / "report.json").read_text())
  assert report["checkpoint_bytes"] < report["parent_checkpoint_bytes"]


@pytest.mark.slow
def test_rerun_skips_finished_and_resumes_unfinished(pipeline_run, tmp_path):
  import shutil
  from rtjax.pipeline import run_pipeline
  config, workdir, results = pipeline_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "qat" / "checkpoints" / "30")  # stopped after step 20
  assert (copy / "qat" / "checkpoints" / "20").exists()
  shutil.rmtree(copy / "int8")
  finished = [p for name in ("teacher", "structured", "student")
              for p in (copy / name).rglob("*") if p.is_file()]
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished}
  again = run_pipeline(config, copy)
  # Finished stages were skipped: not one of their files was rewritten.
  assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished} == before
  assert again["qat"].step == 30
  assert again["qat"].metrics["test"] == pytest.approx(
      results["qat"].metrics["test"], abs=1e-6)


@pytest.mark.slow
def test_widen_pads_with_zero_units_and_keeps_outputs():
  model = models.create_model("resnet", {
      "num_classes": 10, "input_shape": [8, 8, 1], "stem_width": 6,
      "stage_widths": [6, 12], "inner_widths": [5, 12]})
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  models.training_view(model)(x * 2 + 1)
  args = {"num_classes": 10, "input_shape": [8, 8, 1], "stem_width": 6,
          "stage_widths": [6, 12], "blocks_per_stage": [1, 1],
          "stage_strides": [1, 2], "inner_widths": [5, 12]}
  wide, wide_args = structured.widen(model, "resnet", args, 8)
  assert wide_args["stem_width"] == 8 and wide_args["stage_widths"] == [8, 16]
  assert wide_args["inner_widths"] == [8, 16]
  np.testing.assert_allclose(models.inference_view(wide)(x),
                             models.inference_view(model)(x), atol=1e-5)
