"""Sequence model families for MNIST-1D ((N, 40, 1) inputs, 10 classes):
the paper's defaults and their parameter counts, recurrent FLOPs counted per
step, exact structured pruning of recurrent units, streaming steps, BatchNorm
folding and checkpoint-style rebuilds."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax import models
from rtjax.compress import structured
from rtjax.compress.quantize import int8_model
from rtjax.infer.fold import fold_batchnorm
from rtjax.models.quantized import quantization_spec

pytestmark = pytest.mark.slow  # families compiled for 40 unrolled steps

SHAPE = (40, 1)
X = np.random.default_rng(0).normal(size=(4, *SHAPE)).astype(np.float32)


_BUILT = {}


def build(name, **args):
  """(a fresh copy of model `name`, its arguments). Each distinct model is
  created once: creating one compiles its initializers per parameter shape,
  most of these tests' time, so the tests share a few shapes."""
  args = {"num_classes": 10, "input_shape": list(SHAPE), **args}
  key = (name, json.dumps(args, sort_keys=True))
  if key not in _BUILT:
    _BUILT[key] = models.create_model(name, args)
  return nnx.clone(_BUILT[key]), args


def forward(model, x=X):
  """One jitted forward: for feed-forward models, one compile is cheaper
  than eager mode's compile per op and shape (recurrent models run eagerly:
  their 40 steps repeat the same few ops)."""
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def abstract(name, **args):
  """Shapes only, no initialization: enough for counts and FLOPs."""
  return models.abstract_model(name, {"num_classes": 10,
                                      "input_shape": list(SHAPE), **args})


# ---- the paper's models (greydanus/mnist1d notebooks/models.py) as defaults

GRU_DIRECTION = 1 * 18 + 18 + 6 * 18  # dense_i (r, z, n) + bias, dense_h
LSTM_DIRECTION = 1 * 24 + 6 * 24 + 24  # dense_i (i, f, g, o), dense_h + bias
PAPER = {
    # Linear(40, 100), Linear(100, 100), Linear(100, 10).
    "mlp": ({}, 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10),
    "logistic": ({"hidden": []}, 40 * 10 + 10),
    # Conv1d 1->25 k5, 25->25 k3 twice; 40 -> 19 -> 10 -> 5 steps; 125 -> 10.
    "cnn1d": ({}, (5 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (125 * 10 + 10)),
    # Bidirectional, 6 units, Linear over 40 x 2 x 6 outputs.
    "gru": ({}, 2 * GRU_DIRECTION + 480 * 10 + 10),
    "lstm": ({}, 2 * LSTM_DIRECTION + 480 * 10 + 10),
    # Embedding, 40 learned positions, 2 blocks (2 LayerNorms, q/k/v/out of
    # 4 heads x 8, MLP 64), final LayerNorm, head.
    "transformer1d": ({}, (32 + 32) + 40 * 32 + 2 * (
        2 * 64 + 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32))
                      + 64 + 32 * 10 + 10),
    # Variants: global average pool; one-layer unidirectional last-state.
    "cnn1d-mean": ({"head": "mean"}, 150 + 2 * 1900 + 25 * 10 + 10),
    "gru-last": ({"bidirectional": False, "head": "last"},
                 GRU_DIRECTION + 6 * 10 + 10),
}


@pytest.mark.parametrize("family", PAPER)
def test_defaults_are_the_papers_models(family):
  """Counted on the abstract model and traced with abstract values: no init,
  no compute (the other tests run real forwards)."""
  args, params = PAPER[family]
  name = {"logistic": "mlp"}.get(family, family.split("-")[0])
  model = abstract(name, **args)
  assert models.param_count(model) == params
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, X)
  assert out.shape == (4, 10)


def test_transformer1d_sinusoidal_causal():
  model, args = build("transformer1d", embed_dim=8, depth=1, num_heads=2,
                      head_dim=4, mlp_dim=8, positions="sinusoidal",
                      causal=True)
  block = 2 * 16 + 4 * (8 * 8 + 8) + (8 * 8 + 8) + (8 * 8 + 8)
  assert models.param_count(model) == 16 + block + 16 + 90  # no positions
  assert forward(model).shape == (4, 10)
  # Causal: a step's output never depends on later steps.
  tokens = model.embed(X)
  later = tokens.at[:, 30:].add(1.0)
  np.testing.assert_allclose(model.blocks[0](tokens)[:, :30],
                             model.blocks[0](later)[:, :30], atol=1e-6)
  # The ViT's groups: heads and MLP units go, the embedding width stays.
  small, small_args, _ = structured.shrink(model, "transformer1d", args, 0.5)
  assert small_args["num_heads"] == [1] and small_args["mlp_dim"] == [4]
  small_block = (2 * 16 + 3 * (8 * 4 + 4) + (4 * 8 + 8) + (8 * 4 + 4)
                 + (4 * 8 + 8))
  assert models.param_count(small) == 16 + small_block + 16 + 90


def test_transformer1d_patches_group_consecutive_steps():
  common = dict(embed_dim=8, depth=1, num_heads=2, head_dim=4, mlp_dim=8)
  patched, _ = build("transformer1d", patch_size=4, **common)
  assert patched.position.shape == (1, 10, 8)  # 40 steps / 4 per token
  # The same weights over inputs already cut into 10 tokens of 4 steps
  # each: token k is steps 4k..4k+3, in order.
  tokens, _ = build("transformer1d", input_shape=[10, 4], **common)
  nnx.update(tokens, nnx.state(patched))
  np.testing.assert_allclose(forward(patched),
                             forward(tokens, X.reshape(4, 10, 4)), atol=1e-6)
  with pytest.raises(ValueError, match="patch_size must divide the 40"):
    build("transformer1d", patch_size=3)


# ---- FLOPs ------------------------------------------------------------------

def conv_macs(length, kernel, stride, pad, channels_in, channels_out):
  """(multiply-adds, output length) of a 1D conv, counting only the taps that
  land on the input: XLA's cost analysis skips the zero padding."""
  out = (length + 2 * pad - kernel) // stride + 1
  taps = sum(0 <= o * stride - pad + j < length
             for o in range(out) for j in range(kernel))
  return taps * channels_in * channels_out, out


def test_feedforward_flops_match_multiply_adds():
  mlp = abstract("mlp")
  macs = 40 * 100 + 100 * 100 + 100 * 10
  flops = models.forward_flops(mlp, SHAPE)
  assert 2 * macs <= flops <= 1.1 * 2 * macs  # plus biases, ReLUs, residual
  cnn = abstract("cnn1d")
  macs, length, channels = 0, 40, 1
  for kernel in (5, 3, 3):
    m, length = conv_macs(length, kernel, 2, 1, channels, 25)
    macs, channels = macs + m, 25
  assert length == 5
  macs += length * channels * 10
  flops = models.forward_flops(cnn, SHAPE)
  assert 2 * macs <= flops <= 1.1 * 2 * macs  # plus biases and ReLUs


@pytest.mark.parametrize("name,gates,hidden,bidirectional,head", [
    ("gru", 3, [16], True, "all"),
    ("lstm", 4, [16, 8], False, "last"),
])
def test_recurrent_flops_count_every_step(name, gates, hidden, bidirectional,
                                          head):
  """XLA counts an unrolled recurrence's every step (a scan's body would be
  counted once: 1/40 of this). Analytic: 2 x the multiply-adds of both gate
  matmuls (input and state kernels) of every step, layer and direction, plus
  the head. XLA adds the cells' elementwise work, a fixed amount per hidden
  unit and step: per gate entry a bias add, the input + state sum, the gate
  nonlinearity (sigmoid lowers to neg, exp, add, divide) and its share of the
  state update, some recomputed where loop fusion duplicates them (measured
  14 per unit-step for the GRU, 29 for the LSTM). Bounded by 10 per gate
  entry, far below the matmuls' 2 x (inputs + units) per gate entry at
  any width, and the only slack allowed."""
  model = abstract(name, hidden=hidden, bidirectional=bidirectional,
                   head=head)
  steps, width = SHAPE
  directions = 2 if bidirectional else 1
  macs, unit_steps = 0, 0
  for h in hidden:
    macs += directions * steps * (width + h) * gates * h
    unit_steps += directions * steps * h
    width = directions * h
  macs += width * (steps if head == "all" else 1) * 10
  flops = models.forward_flops(model, SHAPE)
  assert 2 * macs <= flops <= 2 * macs + 10 * gates * unit_steps + 10
  print(f"{name}: analytic {2 * macs}, XLA {flops:.0f}, "
        f"ratio {flops / (2 * macs):.3f}")


# ---- structured pruning -----------------------------------------------------

HIDDEN = [6, 6]  # every recurrent model below: shared parameter shapes
DEAD = [[0, 2, 5], [1, 3, 4]]
LIVE = [1, 3, 4]


def _zero_outgoing(model, dead):
  """Zeroes every weight that reads the `dead` units of each layer: their
  rows of the recurrent kernel (into every gate, each direction) and of the
  next layer's input kernels or the head, laid out (time, direction, unit)."""
  stacks = [model.cells] + ([model.reverse_cells]
                            if model.reverse_cells is not None else [])
  directions = len(stacks)
  for i, units in enumerate(dead):
    h = model.cells[i].hidden_features
    for stack in stacks:
      k = np.array(stack[i].dense_h.kernel[...])
      k[units] = 0
      stack[i].dense_h.kernel[...] = k
    if i + 1 < len(dead):
      for stack in stacks:
        k = np.array(stack[i + 1].dense_i.kernel[...])
        k.reshape(directions, h, -1)[:, units] = 0
        stack[i + 1].dense_i.kernel[...] = k
    else:
      k = np.array(model.head.kernel[...])
      k.reshape(-1, directions, h, k.shape[-1])[:, :, units] = 0
      model.head.kernel[...] = k


@pytest.mark.parametrize("name,bidirectional,head", [
    ("gru", True, "all"), ("lstm", False, "last"), ("lstm", True, "last")])
def test_recurrent_shrink_removes_dead_units_exactly(name, bidirectional, head):
  """Units nothing reads (zero outgoing weights) rank lowest under 'l2' and
  go; every gate block, both directions, the next layer and the head are
  sliced consistently, so the outputs stay the same."""
  model, args = build(name, hidden=HIDDEN, bidirectional=bidirectional,
                      head=head)
  _zero_outgoing(model, DEAD)
  reference = np.asarray(model(X))
  small, small_args, summary = structured.shrink(model, name, args, 0.5,
                                                 criterion="l2")
  assert small_args["hidden"] == [3, 3]
  assert summary == {"layer0": {"width": 6, "kept": 3},
                     "layer1": {"width": 6, "kept": 3}}
  # The live units' recurrent kernels survive whole (every gate block).
  gates = model.cells[0].dense_h.kernel.shape[1] // 6
  columns = [g * 6 + j for g in range(gates) for j in LIVE]
  for stack, small_stack in [(model.cells, small.cells)] + (
      [(model.reverse_cells, small.reverse_cells)] if bidirectional else []):
    np.testing.assert_array_equal(
        small_stack[0].dense_h.kernel[...],
        np.asarray(stack[0].dense_h.kernel[...])[np.ix_(LIVE, columns)])
  np.testing.assert_allclose(small(X), reference, atol=1e-5)


def _cnn_with_batchnorm():
  """A CNN with BatchNorm whose running statistics are not trivial (one
  jitted training-mode forward on shifted inputs), built once."""
  model, args = build("cnn1d", channels=[4, 6], kernel_size=[5, 3],
                      batchnorm=True)
  if "cnn_bn" not in _BUILT:
    graphdef, state = nnx.split(models.training_view(model))

    def train_forward(state, x):
      view = nnx.merge(graphdef, state)
      view(x)
      return nnx.state(view, nnx.BatchStat)

    nnx.update(model, jax.jit(train_forward)(state, X * 2 + 1))
    _BUILT["cnn_bn"] = model
  return nnx.clone(_BUILT["cnn_bn"]), args


def test_cnn1d_batchnorm_folds_to_the_same_outputs():
  model, _ = _cnn_with_batchnorm()
  reference = forward(models.inference_view(model))
  folded = fold_batchnorm(model)
  assert not any(isinstance(m, nnx.BatchNorm)
                 for _, m in nnx.iter_graph(folded))
  np.testing.assert_allclose(forward(folded), reference, atol=1e-5)


def test_cnn1d_and_mlp_shrink_dead_units_exactly():
  """The flattened head's rows are (time, channel): the last conv's group
  tiles them. The residual MLP's hidden layers are one group."""
  model, args = _cnn_with_batchnorm()
  for i, units in ((1, [1, 2]), (2, [0, 3, 5])):
    conv, bn = getattr(model, f"conv{i}"), getattr(model, f"conv{i}_bn")
    for p in (conv.kernel, bn.scale, bn.bias):  # BatchNorm outputs 0: ReLU 0
      value = np.array(p[...])
      value[..., units] = 0
      p[...] = value
  reference = forward(models.inference_view(model))
  small, small_args, _ = structured.shrink(model, "cnn1d", args, 0.5)
  assert small_args["channels"] == [2, 3]
  np.testing.assert_allclose(forward(models.inference_view(small)), reference,
                             atol=1e-5)

  model, args = build("mlp", hidden=[8, 8])
  for layer in (model.fc1, model.fc2):
    for p in (layer.kernel, layer.bias):
      value = np.array(p[...])
      value[..., [0, 5, 6, 7]] = 0
      p[...] = value
  reference = forward(model)
  small, small_args, summary = structured.shrink(model, "mlp", args, 0.5)
  assert summary == {"hidden": {"width": 8, "kept": 4}}
  np.testing.assert_allclose(forward(small), reference, atol=1e-5)


# ---- streaming and checkpoints ----------------------------------------------

@pytest.mark.parametrize("name,head", [("lstm", "last"), ("gru", "all")])
def test_step_loop_equals_full_forward(name, head):
  model, _ = build(name, hidden=HIDDEN, bidirectional=False, head=head)
  carry, outputs = model.initial_carry(4), []
  for t in range(SHAPE[0]):
    carry, y = model.step(carry, X[:, t])
    outputs.append(y)
  np.testing.assert_allclose(model.readout(outputs), model(X), atol=1e-5)
  if head == "last":  # any prefix: the streaming logits after step t
    np.testing.assert_allclose(model.readout(outputs[:25]), model(X[:, :25]),
                               atol=1e-5)
  bidirectional, _ = build(name, hidden=HIDDEN, bidirectional=True,
                           head=head)
  with pytest.raises(ValueError, match="unidirectional"):
    bidirectional.step(bidirectional.initial_carry(4), X[:, 0])
  # Training runs the same cells as a scan, both directions included.
  np.testing.assert_allclose(forward(models.training_view(bidirectional)),
                             forward(bidirectional), atol=1e-5)


@pytest.mark.parametrize("name,head", [("gru", "all"), ("lstm", "last")])
def test_recurrent_state_rebuilds_from_metadata_without_rng(name, head):
  """What a checkpoint holds: parameters only (no RNG keys or counts), which
  restore into abstract_model's structure built from the JSON arguments."""
  model, args = build(name, hidden=HIDDEN, bidirectional=True, head=head)
  state = nnx.to_pure_dict(nnx.state(model))
  assert not nnx.state(model, nnx.RngState)
  assert all(not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
             and x.dtype == np.float32 for x in jax.tree.leaves(state))
  rebuilt = models.abstract_model(name, json.loads(json.dumps(args)))
  target = nnx.state(rebuilt)
  assert (jax.tree.structure(nnx.to_pure_dict(target))
          == jax.tree.structure(state))
  nnx.replace_by_pure_dict(target, state)
  nnx.update(rebuilt, target)
  np.testing.assert_array_equal(rebuilt(X), model(X))


def test_unrolled_lstm_converts_to_int8():
  """The reason for the unrolled form: qwix's PTQ quantizes every gate
  kernel (qwix fails on nnx.RNN's scan). The LSTM's input Linear has no
  bias, the case that needs a jax (not numpy) input."""
  model, _ = build("lstm", hidden=HIDDEN, bidirectional=False, head="last")
  served = int8_model(model, quantization_spec("w8", mode="ptq"), SHAPE)
  int8 = [x for x in jax.tree.leaves(nnx.state(served)) if x.dtype == np.int8]
  assert len(int8) == 2 * 2 + 1  # input and state kernels of 2 layers, head
  np.testing.assert_allclose(served(X), model(X), atol=0.05)


def test_mnist1d_tiny_config_trains_end_to_end(tmp_path):
  """configs/mnist1d.py:tiny (the cnn for 60 steps) learns well past chance."""
  from configs import mnist1d
  from rtjax.train import train_and_evaluate
  result = train_and_evaluate(mnist1d.get_config("tiny"), tmp_path)
  assert result.step == 60 and result.metrics["test"]["accuracy"] > 0.3
