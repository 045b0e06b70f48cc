"""Behaviour kept across restructurings: a checkpoint written by an earlier
rtjax (tests/reference/tiny_run, recorded before the code was reorganized)
still loads and serves the recorded logits, and today's tiny run reaches
the recorded parameters."""

import numpy as np
import pytest
from flax import nnx, traverse_util

from tests.conftest import REPO

REFERENCE = f"{REPO}/tests/reference/tiny_run"


def recorded():
  data = np.load(f"{REFERENCE}.npz")
  params = {k.removeprefix("param:"): data[k] for k in data.files
            if k.startswith("param:")}
  return data["images"], data["logits"], params


def flat_params(model):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def test_old_checkpoint_loads_and_serves_the_recorded_logits():
  from rtjax.checkpoint import load_checkpoint
  from rtjax.infer import CompiledModel
  images, logits, params = recorded()
  model, metadata = load_checkpoint(REFERENCE)
  assert metadata["step"] == 20 and metadata["model"]["name"] == "resnet"
  got = flat_params(model)
  assert got.keys() == params.keys()
  for key, value in params.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  served = CompiledModel.from_checkpoint(REFERENCE, batch_sizes=(16,))
  np.testing.assert_allclose(served(images), logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_tiny_run_reaches_the_recorded_parameters(tmp_path):
  """Within 2% of how far training moved each tensor from its
  initialization: XLA's CPU code differs by instruction set (AVX2 against
  AVX-512), and its rounding grows through 20 Adam steps to about 0.7% of
  that movement, while a changed initialization, data order, schedule or
  loss moves tensors by a large part of it."""
  from configs import default
  from rtjax import config as config_lib, models
  from rtjax.checkpoint import load_checkpoint
  from rtjax.data import load_dataset
  from rtjax.train import train_and_evaluate
  from rtjax.train.trainer import model_spec
  config = default.get_config("tiny")
  config.train.num_steps, config.train.warmup_steps = 20, 2
  config.checkpoint.every_steps = 10
  train_and_evaluate(config, tmp_path)
  got = flat_params(load_checkpoint(tmp_path)[0])
  spec = model_spec(config.model, load_dataset(config.data, config.seed))
  initial = flat_params(models.create_model(
      spec["name"], spec["args"], config_lib.init_seed(config, config.train)))
  _, _, params = recorded()
  for key, value in params.items():
    moved = np.linalg.norm(value - initial[key])
    assert moved > 0, key
    assert np.linalg.norm(got[key] - value) <= 0.02 * moved, key
