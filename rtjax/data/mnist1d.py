"""MNIST-1D (Greydanus, 2020): the `mnist1d` package's default dataset, made
by its generator here (nothing downloaded), as (N, 40, 1) sequences."""

from __future__ import annotations

import contextlib
import random

import numpy as np

from rtjax.data.dataset import Dataset, DatasetSpec, Split, split_by_seed
from rtjax.data.registry import register
from rtjax.errors import ConfigError, DataError

NUM_CLASSES = 10
# mnist1d.data.get_dataset_args() defaults: 5,000 examples, 4,000 of them the
# train part and 1,000 the test part.
NUM_SAMPLES = 5000
GENERATOR_SEED = 42
MIN_SAMPLES = 100


@contextlib.contextmanager
def _global_rng_kept():
  """The generator seeds and draws from Python's and numpy's global RNGs
  (mnist1d.utils.set_seed); the rest of the program must not notice."""
  python_state, numpy_state = random.getstate(), np.random.get_state()
  try:
    yield
  finally:
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def generate(num_samples: int = NUM_SAMPLES,
             generator_seed: int = GENERATOR_SEED) -> dict:
  """The package's own make_dataset output (keys x, y, x_test, y_test, ...)
  for its default arguments with these two replaced."""
  with _global_rng_kept():
    try:
      # Imported here: it pulls in matplotlib.pyplot and scipy, which no
      # other dataset needs.
      import mnist1d.data
    except ImportError as e:
      raise DataError(f"mnist1d needs the mnist1d package ({e}); install "
                      "rtjax's dependencies: pip install -e .") from None
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = num_samples, generator_seed
    return mnist1d.data.make_dataset(args)


def _inputs(x: np.ndarray) -> np.ndarray:
  """(N, 40) float64 signals -> (N, 40, 1) float32: one channel, time first."""
  return np.asarray(x, np.float32)[..., None]


def _generator_args(data_config) -> tuple[int, int]:
  """(num_samples, generator seed); a hand-made data config may lack the
  `mnist1d` section: the package's defaults."""
  generator = data_config.get("mnist1d") or {}
  return (generator.get("num_samples", NUM_SAMPLES),
          generator.get("seed", GENERATOR_SEED))


def check(data_config, require) -> None:
  num_samples, generator_seed = _generator_args(data_config)
  require(num_samples >= MIN_SAMPLES and num_samples % NUM_CLASSES == 0,
          "mnist1d.num_samples",
          f"must be a multiple of {NUM_CLASSES} (the generator makes "
          f"num_samples // {NUM_CLASSES} per class) and >= {MIN_SAMPLES}, "
          f"got {num_samples}")
  require(0 <= generator_seed < 2**32, "mnist1d.seed",  # numpy's legacy range
          f"must be in [0, 2**32), got {generator_seed}")


@register(DatasetSpec("mnist1d", (40, 1), NUM_CLASSES), check)
def load(data_config, seed: int) -> Dataset:
  """Train/val from the package's train part (val held out by `seed`), test
  from its test part; inputs float32 (N, 40, 1), labels int32."""
  val_fraction = data_config.val_fraction
  raw = generate(*_generator_args(data_config))
  try:
    train, val = split_by_seed(_inputs(raw["x"]), raw["y"].astype(np.int32),
                               val_fraction, seed)
  except ValueError as e:  # sklearn: too few examples to stratify
    raise ConfigError(
        f"data.val_fraction: {val_fraction} of mnist1d's {len(raw['y'])} "
        f"training examples cannot give train and val every class ({e}); "
        "raise data.mnist1d.num_samples or change data.val_fraction") from None
  test = Split(_inputs(raw["x_test"]), raw["y_test"].astype(np.int32))
  return Dataset("mnist1d", train, val, test, num_classes=NUM_CLASSES)
