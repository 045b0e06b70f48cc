"""Conv lowerings: a banded matmul computes the same conv as XLA's, and the
serving function keeps its outputs whatever lowering it picks or is given."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax import models
from rtjax.infer import CompiledModel
from rtjax.infer import lowering
from rtjax.models.lenet import max_pool_2x2


def images(n, shape, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((1, 2), (2, 2))])
@pytest.mark.parametrize("channels,features,use_bias", [(3, 6, True),
                                                         (6, 16, False)])
def test_banded_conv_equals_the_conv(padding, channels, features, use_bias):
  conv = nnx.Conv(channels, features, (5, 5), padding=padding,
                  use_bias=use_bias, rngs=nnx.Rngs(0))
  if use_bias:
    conv.bias = nnx.Param(jax.random.normal(jax.random.key(1), (features,)))
  x = images(3, (14, 12, channels))
  expected = conv(x)
  out_h, out_w = expected.shape[1:3]
  blocks = [(1, c) for c in range(1, out_w + 1) if out_w % c == 0]
  blocks += [(r, r) for r in range(2, out_h + 1) if out_h % r == out_w % r == 0]
  blocks += [(out_h, 1)]
  assert len(blocks) >= 5
  for block in blocks:  # compiled, as served (op by op is slower here)
    banded = lowering.BandedConv(conv, x.shape[1:], block)
    np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(banded, x), expected,
                               atol=2e-5, rtol=1e-5, err_msg=f"block {block}")
  with pytest.raises(ValueError, match="does not divide"):
    lowering.BandedConv(conv, x.shape[1:], (1, out_w + 1))


@pytest.mark.parametrize("kernel,strides,padding,spatial", [
    ((5,), (2,), "SAME", (40,)), ((3,), (2,), "VALID", (19,)),
    ((3,), (1,), ((2, 1),), (10,)), ((3, 3), (2, 2), "SAME", (9, 8)),
    ((5, 5), (1, 1), "VALID", (14, 12))])
def test_patch_conv_equals_the_conv(kernel, strides, padding, spatial):
  conv = nnx.Conv(3, 8, kernel, strides=strides, padding=padding,
                  rngs=nnx.Rngs(0))
  conv.bias = nnx.Param(jax.random.normal(jax.random.key(1), (8,)))
  x = images(3, (*spatial, 3))
  np.testing.assert_allclose(lowering.PatchConv(conv, x.shape[1:])(x),
                             conv(x), atol=2e-5, rtol=1e-5)


def test_candidates_patches_for_every_float_conv_bands_for_stride_1_2d():
  resnet = models.create_model("resnet", {"num_classes": 10,
                                          "input_shape": (8, 8, 1)})
  candidates = lowering.candidate_blocks(resnet, (8, 8, 1))
  strided = ["/".join(map(str, p)) for p, m in nnx.iter_graph(resnet)
             if isinstance(m, nnx.Conv) and m.strides not in (1, (1, 1), None)]
  assert candidates and strided
  for path, blocks in candidates.items():
    assert blocks[0] == lowering.PATCHES
    assert (len(blocks) == 1) == (path in strided), path
  lenet = models.create_model("lenet5", {"num_classes": 10})
  # conv1: 28x28 outputs; 1x28 would cost 6.4x the conv's FLOPs, 7x7 4.8x.
  assert lowering.candidate_blocks(lenet, (32, 32, 3)) == {
      "conv1": ["patches", (1, 2), (1, 4), (1, 7), (1, 14), (2, 2), (4, 4)],
      "conv2": ["patches", (1, 2), (1, 5), (1, 10), (2, 2), (5, 5)]}
  cnn1d = models.create_model("cnn1d", {"num_classes": 10,
                                        "input_shape": (40, 1)})
  convs = [m for _, m in nnx.iter_graph(cnn1d) if isinstance(m, nnx.Conv)]
  assert list(lowering.candidate_blocks(cnn1d, (40, 1)).values()) == [
      ["patches"]] * len(convs)
  with pytest.raises(ValueError, match="no conv layer 'conv9'.*conv1"):
    lowering.apply_lowering(lenet, (32, 32, 3), {"conv9": 2})
  with pytest.raises(ValueError, match="not a stride-1 float 2D conv"):
    lowering.apply_lowering(resnet, (8, 8, 1), {strided[0]: 2})


def test_parse_and_describe_lowering():
  assert lowering.parse_lowering("auto") == "auto"
  pinned = lowering.parse_lowering("conv1:4x4,stages/0/conv:2,conv3:patches")
  assert pinned == {"conv1": (4, 4), "stages/0/conv": (1, 2),
                    "conv3": "patches"}
  assert lowering.parse_lowering(lowering.describe(pinned)) == pinned
  assert lowering.describe({}) == "xla"
  for bad in ("conv1", "conv1:x", ":4", "conv1:0", "conv1:2x", "conv1:1x2x3"):
    with pytest.raises(ValueError, match="bad conv lowering"):
      lowering.parse_lowering(bad)


def test_strided_slice_pool_equals_nnx_max_pool():
  x = images(2, (9, 10, 4))
  np.testing.assert_array_equal(
      max_pool_2x2(x), nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)))


def test_pinned_lowering_really_replaces_the_conv(untrained_checkpoints):
  path = untrained_checkpoints["lenet5"]
  plain = CompiledModel.from_checkpoint(path, batch_sizes=(8,))
  banded = CompiledModel.from_checkpoint(
      path, batch_sizes=(8,), conv_lowering={"conv1": (4, 4), "conv2": 5},
      embed_weights=True)
  x = images(8, plain.input_shape)
  np.testing.assert_allclose(banded(x), plain(x), atol=1e-5)
  assert plain.executables[8].as_text().count("convolution(") == 2
  assert "convolution(" not in banded.executables[8].as_text()
  assert banded.states[8] == {}  # embedded: the call passes only the images
  assert banded.conv_lowering == {8: {"conv1": (4, 4), "conv2": (1, 5)}}


@pytest.mark.slow
@pytest.mark.parametrize("family,batches", [("lenet5", (1, 16)),
                                            ("resnet", (4,))])
def test_auto_lowering_keeps_outputs_and_picks_its_fastest_trial(
    family_checkpoints, family, batches, monkeypatch):
  # Each trial timed for its minimum of calls, not for half a second: the
  # choice is still the fastest of what was timed, which is what is checked.
  monkeypatch.setattr(lowering, "median_seconds_in_turns", functools.partial(
      lowering.median_seconds_in_turns, budget_s=0.0))
  path = family_checkpoints[family]
  plain = CompiledModel.from_checkpoint(path, batch_sizes=batches)
  auto = CompiledModel.from_checkpoint(path, batch_sizes=batches,
                                       conv_lowering="auto")
  x = images(17, plain.input_shape)
  np.testing.assert_allclose(auto(x), plain(x), atol=1e-5)
  candidates = lowering.candidate_blocks(
      models.create_model(auto.metadata["model"]["name"],
                          auto.metadata["model"]["args"]),
      plain.input_shape)
  for batch in batches:
    trials = auto.lowering_trials[batch]
    assert trials[0]["lowering"] == {}  # XLA's convs first: the baseline
    per_layer = sum(len(b) for b in candidates.values())
    # Then every conv as patches at once, unless the greedy pass chose that.
    assert len(trials) in (1 + per_layer, 2 + per_layer)
    if len(trials) == 2 + per_layer:
      assert trials[-1]["lowering"] == {p: "patches" for p in candidates}
    if auto.conv_lowering[batch]:  # kept only faster than what it was timed against
      chosen = [t for t in trials[1:]
                if t["lowering"] == auto.conv_lowering[batch]]
      assert chosen and chosen[-1]["seconds"] < chosen[-1]["against"]
    for layer, block in auto.conv_lowering[batch].items():
      assert block in candidates[layer]
