"""Layer dropping (rtjax.models.depth): a family's droppable blocks go, the
rest keep the parent's weights, so a block made an identity in the parent
gives exactly the parent's outputs without it."""

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax import models

FAMILIES = {
    "vit": {"num_classes": 10, "input_shape": [8, 8, 1], "depth": 3,
            "num_heads": [4, 2, 3]},
    "resnet": {"num_classes": 10, "input_shape": [8, 8, 1],
               "stem_width": 8, "stage_widths": [8, 16],
               "blocks_per_stage": [2, 2]},
}


def _make_identity(model, name: str, i: int) -> None:
  """Block i's residual branch zeroed: the block passes its input on."""
  block = model.blocks[i]
  if name == "resnet":  # relu(0 + x) = x for the post-relu x
    zeros = [block.conv2_bn.scale, block.conv2_bn.bias]
  else:
    zeros = [block.attention.out.kernel, block.attention.out.bias,
             block.mlp_out.kernel, block.mlp_out.bias]
  for variable in zeros:
    variable.set_value(np.zeros_like(variable.get_value()))


@pytest.mark.parametrize("name", FAMILIES)
def test_dropping_an_identity_block_keeps_the_outputs(name):
  args = FAMILIES[name]
  model = models.create_model(name, args, seed=1)
  droppable = models.droppable_blocks(name, args)
  i = droppable[-1]
  _make_identity(model, name, i)
  smaller, smaller_args = models.drop_blocks(model, name, args, [i])
  assert models.block_count(name, smaller_args) == \
      models.block_count(name, args) - 1
  x = np.random.RandomState(0).randn(4, *args["input_shape"]).astype(
      np.float32)
  forward = nnx.jit(lambda m, x: models.inference_view(m)(x))
  np.testing.assert_allclose(forward(smaller, x), forward(model, x),
                             atol=1e-5)


def test_droppable_blocks_keep_every_other_shape():
  # ResNet: a stage's first block changes width or stride; GRU: the first
  # layer reads the inputs, and a layer narrower than the one below stays.
  assert models.droppable_blocks("resnet", FAMILIES["resnet"]) == [1, 3]
  gru = {"num_classes": 10, "input_shape": [40, 1], "hidden": [8, 8, 4, 4]}
  assert models.droppable_blocks("gru", gru) == [1, 3]
  model = models.create_model("gru", gru)
  smaller, args = models.drop_blocks(model, "gru", gru, [1])
  assert args["hidden"] == [8, 4, 4]
  kept = nnx.to_pure_dict(nnx.state(smaller))
  old = nnx.to_pure_dict(nnx.state(model))
  for new, parent in ((0, 0), (1, 2), (2, 3)):
    jax.tree.map(np.testing.assert_array_equal, kept["cells"][new],
                 old["cells"][parent])
  with pytest.raises(ValueError, match="not all droppable"):
    models.drop_blocks(model, "gru", gru, [0])
