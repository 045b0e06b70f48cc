"""Model families: shapes, exact parameter counts, FLOPs, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtjax import models
from rtjax.errors import ConfigError


def test_lenet5_is_the_classic_cifar_lenet5():
  model = models.create_model("lenet5", {"num_classes": 10,
                                         "input_shape": (32, 32, 3)})
  assert model(jnp.zeros((3, 32, 32, 3))).shape == (3, 10)
  assert model.conv1.kernel.shape == (5, 5, 3, 6)
  assert model.conv2.kernel.shape == (5, 5, 6, 16)
  assert model.fc1.kernel.shape == (400, 120)
  assert model.fc2.kernel.shape == (120, 84)
  assert model.head.kernel.shape == (84, 10)
  # conv1 456 + conv2 2416 + fc 48120 + 10164 + 850.
  assert models.param_count(model) == 62006


def test_resnet_shapes_and_param_count():
  model = models.create_model("resnet", {
      "num_classes": 10, "input_shape": (8, 8, 1), "stem_width": 4,
      "stage_widths": (4, 8), "blocks_per_stage": (1, 1),
      "stage_strides": (1, 2)})
  assert model(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)
  stem = 3 * 3 * 1 * 4 + 2 * 4
  block1 = 2 * (3 * 3 * 4 * 4 + 2 * 4)  # no projection: same width, stride 1
  block2 = (3 * 3 * 4 * 8 + 2 * 8) + (3 * 3 * 8 * 8 + 2 * 8) + (4 * 8 + 2 * 8)
  head = 8 * 10 + 10
  assert models.param_count(model) == stem + block1 + block2 + head
  assert model.blocks[0].proj is None and model.blocks[1].proj is not None


@pytest.mark.slow
def test_resnet_inner_widths_are_per_block():
  model = models.create_model("resnet", {
      "num_classes": 3, "input_shape": (8, 8, 1), "stem_width": 4,
      "stage_widths": (4, 8), "blocks_per_stage": (1, 2),
      "stage_strides": (1, 2), "inner_widths": (2, 5, 3)})
  assert [b.conv1.kernel.shape[-1] for b in model.blocks] == [2, 5, 3]
  assert model(jnp.zeros((1, 8, 8, 1))).shape == (1, 3)
  with pytest.raises(ValueError, match="inner_widths needs 3 entries"):
    models.create_model("resnet", {
        "num_classes": 3, "input_shape": (8, 8, 1), "stage_widths": (4, 8),
        "blocks_per_stage": (1, 2), "inner_widths": (2, 5)})


def test_vit_shapes_and_param_count():
  model = models.create_model("vit", {
      "num_classes": 10, "input_shape": (8, 8, 1), "patch_size": 2,
      "embed_dim": 8, "depth": 1, "num_heads": 2, "head_dim": 4,
      "mlp_dim": 16})
  assert model(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)
  patch = 2 * 2 * 1 * 8 + 8
  position = 16 * 8
  attention = 3 * (8 * 8 + 8) + (8 * 8 + 8)  # q, k, v (2 heads x 4) and out
  mlp = (8 * 16 + 16) + (16 * 8 + 8)
  block = 2 * (2 * 8) + attention + mlp  # two LayerNorms
  head = 2 * 8 + 8 * 10 + 10  # final LayerNorm and dense
  assert models.param_count(model) == patch + position + block + head


def test_vit_heads_and_mlp_per_block():
  model = models.create_model("vit", {
      "num_classes": 4, "input_shape": (8, 8, 1), "embed_dim": 8,
      "depth": 2, "num_heads": (2, 1), "head_dim": 4, "mlp_dim": (16, 4)})
  assert model.blocks[1].attention.query.kernel.shape == (8, 4)
  assert model.blocks[1].mlp_in.kernel.shape == (8, 4)
  assert model(jnp.zeros((1, 8, 8, 1))).shape == (1, 4)


def test_flops_match_lenet5_multiply_adds():
  model = models.create_model("lenet5", {"num_classes": 10,
                                         "input_shape": (32, 32, 3)})
  macs = (28 * 28 * 6 * 5 * 5 * 3 + 10 * 10 * 16 * 5 * 5 * 6
          + 400 * 120 + 120 * 84 + 84 * 10)
  flops = models.forward_flops(model, (32, 32, 3))
  # 2 FLOPs per multiply-add, plus biases, ReLUs and pooling.
  assert 2 * macs <= flops <= 1.1 * 2 * macs
  assert models.forward_flops(model, (32, 32, 3), batch_size=4) == pytest.approx(
      4 * flops, rel=0.01)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_flops_positive_for_every_family(name):
  model = models.create_model(name, {"num_classes": 10,
                                     "input_shape": (8, 8, 1)})
  assert models.forward_flops(model, (8, 8, 1)) > models.param_count(model)


def test_unknown_model_lists_known_ones():
  with pytest.raises(ConfigError, match="known models: cnn1d, decoder, gru, lenet5, lstm, mlp, resnet, transformer1d, vit"):
    models.create_model("alexnet", {})


def test_inference_view_is_per_example_training_view_is_not():
  """Inference uses BatchNorm running averages; training uses batch statistics."""
  model = models.create_model("resnet", {"num_classes": 10,
                                         "input_shape": (8, 8, 1)})
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  infer = models.inference_view(model)
  np.testing.assert_allclose(infer(x[:1]), infer(x)[:1], atol=1e-6)
  train = models.training_view(model)
  assert not np.allclose(train(x[:2])[:1], train(x)[:1], atol=1e-3)


# One small instance of each family and the input it takes.
SMALL = {
    "resnet": ({"stem_width": 4, "stage_widths": [4, 8],
                "blocks_per_stage": [2, 1], "stage_strides": [1, 2]}, [8, 8, 1]),
    "lenet5": ({}, [16, 16, 1]),
    "vit": ({"embed_dim": 8, "depth": 2, "num_heads": [2, 1], "head_dim": 4,
             "mlp_dim": [8, 4]}, [8, 8, 1]),
    "cnn1d": ({"channels": [4, 4, 4]}, [40, 1]),
    "mlp": ({"hidden": [8, 8]}, [40, 1]),
    "gru": ({"hidden": [4, 4]}, [6, 1]),
    "lstm": ({"hidden": [4, 4]}, [6, 1]),
    "transformer1d": ({"embed_dim": 8, "depth": 2, "num_heads": 2,
                       "head_dim": 4, "mlp_dim": 8}, [6, 1]),
    "decoder": ({"embed_dim": 8, "depth": 2, "num_heads": 2, "num_kv_heads": 1,
                 "head_dim": 4, "mlp_dim": 8}, [6]),
}


def test_every_family_is_in_the_depth_table():
  assert sorted(SMALL) == models.model_names()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shallower_members_build_with_fewer_layers(name):
  """Each family declares its depth rule beside its class, or why it has
  none; every member the rule gives builds with fewer parameter arrays (a
  flattening head may grow, so not always fewer parameters)."""
  own, shape = SMALL[name]
  args = {**own, "num_classes": 3, "input_shape": shape}
  students = models.shallower(name, args)
  reason = models.no_shallower_reason(name)
  assert bool(students) != bool(reason), (students, reason)
  arrays = lambda a: len(jax.tree.leaves(nnx.state(
      models.abstract_model(name, a), nnx.Param)))
  for student in students:
    assert student["input_shape"] == shape and student["num_classes"] == 3
    assert arrays(student) < arrays(args)


def test_resnet_depth_rule_drops_a_block_and_a_stage():
  own, shape = SMALL["resnet"]
  fewer_blocks, fewer_stages = models.shallower(
      "resnet", {**own, "num_classes": 3, "input_shape": shape})
  assert fewer_blocks["blocks_per_stage"] == [1, 1]
  assert fewer_stages["stage_widths"] == [4]
  assert fewer_stages["blocks_per_stage"] == [2]
  assert "inner_widths" not in fewer_blocks  # follows from the new layout


def test_a_family_must_declare_its_depth_rule_or_why_not():
  from rtjax.models import registry

  class Undeclared(nnx.Module):
    pass

  with pytest.raises(ValueError, match="shallower.*no_shallower"):
    registry.register("undeclared")(Undeclared)
  assert "undeclared" not in models.model_names()
