"""The decoder family: causal next-token logits, grouped-query attention,
structured pruning of key/value heads (their query groups with them) and
MLP units, and configs/lm.py:tiny trained on the plays."""

import math

import numpy as np
import pytest

from configs import lm
from rtjax import models
from rtjax.compress import structured

ARGS = {"num_classes": 11, "input_shape": [12], "embed_dim": 16, "depth": 2,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "mlp_dim": 24,
        "gated": True}


def test_a_position_sees_only_itself_and_the_past():
  model = models.create_model("decoder", ARGS)
  tokens = np.random.default_rng(0).integers(0, 11, (2, 12)).astype(np.int32)
  logits = np.asarray(model(tokens))
  assert logits.shape == (2, 12, 11)
  changed = tokens.copy()
  changed[:, 7:] = (changed[:, 7:] + 1) % 11
  after = np.asarray(model(changed))
  np.testing.assert_allclose(after[:, :7], logits[:, :7], atol=1e-6)
  assert np.abs(after[:, 7:] - logits[:, 7:]).max() > 1e-3


def test_pruning_keeps_whole_query_groups_and_rebuilds():
  model = models.create_model("decoder", ARGS)
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 11
  reference = np.asarray(model(tokens))
  same, _, _ = structured.shrink(model, "decoder", ARGS, 1.0, "l2")
  np.testing.assert_array_equal(same(tokens), reference)
  small, small_args, _ = structured.shrink(model, "decoder", ARGS, 0.5, "l2")
  assert small_args["num_kv_heads"] == [1, 1]
  assert small_args["num_heads"] == [2, 2]  # two query heads per kv head
  assert small_args["mlp_dim"] == [12, 12]
  assert small(tokens).shape == (2, 12, 11)
  rebuilt = models.create_model("decoder", small_args)
  assert models.param_count(rebuilt) == models.param_count(small)
  assert models.forward_flops(small, [12]) < models.forward_flops(model, [12])


def test_kv_heads_must_divide_query_heads():
  with pytest.raises(ValueError, match="num_kv_heads must divide"):
    models.create_model("decoder", {**ARGS, "num_kv_heads": 3})


@pytest.mark.slow
def test_tiny_lm_trains_and_reports_bits_per_character(tmp_path):
  from rtjax.train import train_and_evaluate
  config = lm.get_config("tiny")
  result = train_and_evaluate(config, tmp_path)
  test = result.metrics["test"]
  assert test["bits_per_token"] == pytest.approx(test["loss"] / math.log(2))
  # 30 steps beat a uniform guess over the 78 characters (6.29 bits).
  assert test["bits_per_token"] < math.log2(78) - 1.0


def test_ngram_baselines_are_distributions():
  from rtjax.train import ngram
  rng = np.random.default_rng(0)
  train = rng.integers(0, 5, 500)
  history = [1, 2, 3, 4]
  for order in (1, 3, 5):
    total = sum(ngram.probabilities(train, np.array(history + [c]), order,
                                    6)[-1] for c in range(6))
    assert total == pytest.approx(1.0)
  # A sequence the model has seen costs fewer bits than a uniform guess.
  assert ngram.bits_per_token(train, train[:100], 3, 6) < np.log2(6)
