"""mnist1d: the package's default dataset exactly, (N, 40, 1) sequences, made
without touching the program's global RNGs; sequence batches shift in time."""

import random

import ml_collections
import mnist1d.data
import numpy as np
import pytest

from rtjax import config as config_lib
from rtjax.data import TrainBatches, eval_batches, load_dataset
from rtjax.data.dataset import split_by_seed
from rtjax.errors import ConfigError

pytestmark = pytest.mark.slow  # generates the dataset


def data_config(**overrides):
  config = config_lib.base_config().data
  config.name = "mnist1d"
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def package():
  """What the package itself makes for its default arguments (its own global
  seeding undone afterwards, so later tests see the states they had)."""
  python_state, numpy_state = random.getstate(), np.random.get_state()
  try:
    return mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
  finally:
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@pytest.fixture(scope="module")
def dataset():
  return load_dataset(data_config(), seed=0)


def test_is_the_packages_default_dataset(package, dataset):
  assert package["x"].shape == (4000, 40)
  assert package["x_test"].shape == (1000, 40)
  assert dataset.name == "mnist1d" and dataset.num_classes == 10
  assert dataset.input_shape == (40, 1)
  assert dataset.describe()["input_shape"] == [40, 1]
  sizes = len(dataset.train), len(dataset.val), len(dataset.test)
  assert sizes == (3600, 400, 1000)  # 4,000 train part, val_fraction 0.1
  for split in (dataset.train, dataset.val, dataset.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert set(np.unique(split.labels)) == set(range(10))
  # Test: the package's test part, same values, same order.
  np.testing.assert_array_equal(dataset.test.images[..., 0],
                                package["x_test"].astype(np.float32))
  np.testing.assert_array_equal(dataset.test.labels, package["y_test"])
  # Train + val: the package's train part, split by the existing stratified
  # split with the config seed.
  x = package["x"].astype(np.float32)[..., None]
  train, val = split_by_seed(x, package["y"].astype(np.int32), 0.1, 0)
  for ours, expected in ((dataset.train, train), (dataset.val, val)):
    np.testing.assert_array_equal(ours.images, expected.images)
    np.testing.assert_array_equal(ours.labels, expected.labels)
  together = np.concatenate([dataset.train.images, dataset.val.images])[..., 0]
  np.testing.assert_array_equal(_sorted_rows(together), _sorted_rows(x[..., 0]))


def _sorted_rows(a: np.ndarray) -> np.ndarray:
  return a[np.lexsort(a.T[::-1])]


@pytest.fixture
def global_rngs_restored():
  """This test seeds the global RNGs itself; the tests after it must not see
  that either."""
  python_state, numpy_state = random.getstate(), np.random.get_state()
  yield
  random.setstate(python_state)
  np.random.set_state(numpy_state)


def test_global_random_states_are_left_alone(global_rngs_restored):
  random.seed(7)
  np.random.seed(7)
  python_state, numpy_state = random.getstate(), np.random.get_state()
  # The package seeds and draws from both: unguarded, they would change.
  args = mnist1d.data.get_dataset_args()
  args.num_samples = 200
  mnist1d.data.make_dataset(args)
  assert random.getstate() != python_state
  assert not np.array_equal(np.random.get_state()[1], numpy_state[1])

  random.setstate(python_state)
  np.random.set_state(numpy_state)
  load_dataset(data_config(val_fraction=0.25, mnist1d=dict(num_samples=200)),
               seed=0)
  drawn = random.random(), np.random.rand(4)
  random.setstate(python_state)
  np.random.set_state(numpy_state)
  assert drawn[0] == random.random()
  np.testing.assert_array_equal(drawn[1], np.random.rand(4))


def test_generator_arguments_come_from_the_config(dataset):
  small = load_dataset(data_config(
      val_fraction=0.25, mnist1d=dict(num_samples=1000, seed=1)), seed=0)
  assert (len(small.train), len(small.val), len(small.test)) == (600, 200, 200)
  assert small.input_shape == (40, 1)
  assert not np.array_equal(small.test.images[:10], dataset.test.images[:10])
  # A hand-made data config without the section gets the package's defaults.
  bare = ml_collections.ConfigDict(dict(name="mnist1d", val_fraction=0.1))
  np.testing.assert_array_equal(
      load_dataset(bare, seed=0).test.images, dataset.test.images)


def test_sequence_batches_shift_in_time_with_zero_fill(dataset):
  max_shift = 3
  plain = TrainBatches(dataset.train, 64, seed=4, max_shift=0)
  shifted = TrainBatches(dataset.train, 64, seed=4, max_shift=max_shift)
  shifts = set()
  for step in (0, 1, 70):  # the same rows either way: only the shift differs
    originals, labels = plain.batch(step)
    inputs, shifted_labels = shifted.batch(step)
    np.testing.assert_array_equal(labels, shifted_labels)
    assert inputs.shape == (64, 40, 1) and inputs.dtype == np.float32
    for original, moved in zip(originals[..., 0], inputs[..., 0]):
      matches = [s for s in range(-max_shift, max_shift + 1)
                 if np.array_equal(moved, _shifted(original, s))]
      assert len(matches) == 1, "not a time-shifted copy of its example"
      shifts.add(matches[0])
  assert shifts == set(range(-max_shift, max_shift + 1))


def _shifted(row: np.ndarray, s: int) -> np.ndarray:
  """row moved s steps later in time (earlier if negative), zeros coming in."""
  out = np.zeros_like(row)
  if s >= 0:
    out[s:] = row[:len(row) - s]
  else:
    out[:s] = row[-s:]
  return out


def test_eval_batches_keep_the_sequence_shape(dataset):
  images, labels, mask = next(eval_batches(dataset.test, 512))
  assert images.shape == (512, 40, 1) and mask.all()


@pytest.mark.parametrize("overrides,message", [
    (dict(num_samples=105), "num_samples: must be a multiple of 10"),
    (dict(num_samples=50), "num_samples: must be a multiple of 10"),
    (dict(seed=-1), r"seed: must be in \[0, 2\*\*32\)"),
])
def test_bad_generator_arguments_are_config_errors(overrides, message):
  """Named by config validation, and by the loader for hand-made configs."""
  config = config_lib.base_config()
  config.data.name = "mnist1d"
  config.data.mnist1d.update(overrides)
  with pytest.raises(ConfigError, match="config.data.mnist1d." + message):
    config_lib.validate(config)
  with pytest.raises(ConfigError, match="^data.mnist1d." + message):
    load_dataset(config.data, seed=0)


def test_a_val_split_too_small_to_stratify_is_a_config_error():
  # 100 samples: an 80-example train part, 10% of it is 8 < 10 classes.
  config = data_config(mnist1d=dict(num_samples=100))
  with pytest.raises(ConfigError, match=r"data.val_fraction: 0.1 of mnist1d's "
                     r"80 training examples.*raise data.mnist1d.num_samples"):
    load_dataset(config, seed=0)
  small = load_dataset(data_config(val_fraction=0.25,
                                   mnist1d=dict(num_samples=100)), seed=0)
  assert (len(small.train), len(small.val), len(small.test)) == (60, 20, 20)


def test_base_config_defaults_validate_for_mnist1d():
  config = config_lib.base_config()
  config.data.name = "mnist1d"
  config_lib.validate(config)
  assert config.data.mnist1d.to_dict() == {"num_samples": 5000, "seed": 42}
