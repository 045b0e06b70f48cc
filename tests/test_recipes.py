"""docs/ARCHITECTURE.md's recipes, followed to the letter: a tiny model family
and a tiny dataset added through the documented hooks alone (nothing in
rtjax edited) go through training, structured pruning, the optimizer's
candidate generation (shallower students included) and serving."""

import logging
import math

import numpy as np
import pytest
from flax import nnx

from rtjax import config as config_lib
from rtjax.checkpoint import load_checkpoint
from rtjax.data import registry as data_registry
from rtjax.data.dataset import Dataset, DatasetSpec, split_by_seed
from rtjax.infer import CompiledModel
from rtjax.models import registry as model_registry
from rtjax.models.groups import Axis, Group
from rtjax.optimize import candidates
from rtjax.pipeline import run_pipeline, stage_config
from rtjax.train import train_and_evaluate

SHAPE, CLASSES = (8, 2), 3


def _define_family():
  """The recipe "add a model family": a class registered by name, with its
  prunable groups, its widths and its depth rule beside it."""

  @model_registry.register("tiny_mlp")
  class TinyMLP(nnx.Module):
    def __init__(self, num_classes, input_shape, hidden=(16, 16), *, rngs):
      widths = [math.prod(input_shape), *hidden]
      self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                              for a, b in zip(widths, widths[1:])])
      self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x):
      x = x.reshape(x.shape[0], -1)
      for layer in self.layers:
        x = nnx.relu(layer(x))
      return self.head(x)

    @staticmethod
    def prunable_groups(args):
      hidden = list(model_registry.full_args(TinyMLP, args)["hidden"])
      return [Group(f"layers/{i}", width,
                    [Axis(f"layers/{i}/kernel", 1), Axis(f"layers/{i}/bias", 0),
                     Axis(f"layers/{i + 1}/kernel" if i + 1 < len(hidden)
                          else "head/kernel", 0)],
                    [Axis(f"layers/{i}/kernel", 1)])
              for i, width in enumerate(hidden)]

    @staticmethod
    def with_widths(args, widths):
      depth = len(model_registry.full_args(TinyMLP, args)["hidden"])
      return {**args, "hidden": [widths[f"layers/{i}"] for i in range(depth)]}

    @staticmethod
    def shallower(args):
      hidden = list(args["hidden"])
      return [{**args, "hidden": hidden[:-1]}] if len(hidden) > 1 else []

  @model_registry.register("tiny_fixed")
  class TinyFixed(TinyMLP):
    shallower = None
    no_shallower = "its depth is fixed by definition"


def _define_dataset():
  """The recipe "add a dataset": a loader registered with what it declares."""

  @data_registry.register(DatasetSpec("tiny", SHAPE, CLASSES))
  def load(data_config, seed):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, *SHAPE)).astype(np.float32) * 2
    labels = np.repeat(np.arange(CLASSES, dtype=np.int32), 80)
    images = centers[labels] + rng.normal(
        size=(len(labels), *SHAPE)).astype(np.float32) * 0.5
    rest, test = split_by_seed(images, labels, 0.25, 0)
    train, val = split_by_seed(rest.images, rest.labels,
                               data_config.val_fraction, seed)
    return Dataset("tiny", train, val, test, CLASSES)


@pytest.fixture
def tiny_family_and_dataset():
  _define_family()
  _define_dataset()
  try:
    yield
  finally:  # the next test sees the registries as shipped
    for name in ("tiny_mlp", "tiny_fixed"):
      model_registry._REGISTRY.pop(name)
    data_registry._DATASETS.pop("tiny")


def _config():
  config = config_lib.base_config()
  config.model.name = "tiny_mlp"
  config.data.name = "tiny"
  config.data.max_shift = 0
  config.train.update(batch_size=32, num_steps=40, warmup_steps=5,
                      learning_rate=1e-2, log_every=20, eval_every=40,
                      eval_batch_size=64)
  config.checkpoint.every_steps = 40
  return config


def test_a_new_family_and_dataset_train_prune_search_and_serve(
    tiny_family_and_dataset, tmp_path, caplog):
  config = _config()
  teacher = train_and_evaluate(config, tmp_path / "train")
  assert teacher.metrics["test"]["accuracy"] >= 0.9  # well separated classes

  # Structured pruning: the pipeline skips the finished "train" stage and
  # prunes its checkpoint through the family's groups.
  config.stages = ("train", "prune")
  config.stage.train = stage_config("train")
  config.stage.prune = stage_config(
      "structured_prune", keep_fraction=0.5,
      train={"num_steps": 10, "warmup_steps": 2, "eval_every": 10})
  pruned = run_pipeline(config, tmp_path)["prune"]
  model, meta = load_checkpoint(pruned.checkpoint_dir)
  assert meta["stage_type"] == "structured_prune"
  assert meta["parent"] == str(tmp_path / "train")
  assert meta["model"]["args"]["hidden"] == [8, 8]
  assert meta["dataset"]["input_shape"] == list(SHAPE)

  # Candidate generation: uniform prunings and the family's shallower
  # students; a family that declares none is reported.
  _, parent_meta = load_checkpoint(tmp_path / "train")
  recipes = {r["name"]: r for r in candidates.recipes(
      parent_meta["model"], {"groups": []}, thresholds=())}
  assert recipes["shallow0"]["args"]["hidden"] == [16]
  assert recipes["shallow0_half"]["args"]["hidden"] == [8]
  assert "uniform50" in recipes
  student, _ = candidates.build(recipes["shallow0"], None, parent_meta["model"])
  assert student(np.zeros((2, *SHAPE), np.float32)).shape == (2, CLASSES)
  caplog.set_level(logging.INFO, logger="absl")
  fixed = {**parent_meta["model"], "name": "tiny_fixed"}
  names = [r["name"] for r in candidates.recipes(fixed, {"groups": []},
                                                  thresholds=())]
  assert not [n for n in names if n.startswith("shallow")]
  assert ("no shallower students of tiny_fixed: its depth is fixed by "
          "definition") in caplog.text

  # Serving: the pruned checkpoint alone, compiled, agrees with the model.
  served = CompiledModel.from_checkpoint(pruned.checkpoint_dir,
                                         batch_sizes=(4,))
  images = np.random.default_rng(1).normal(size=(4, *SHAPE)).astype(
      np.float32)
  np.testing.assert_allclose(served(images), np.asarray(model(images)),
                             rtol=1e-4, atol=1e-4)

