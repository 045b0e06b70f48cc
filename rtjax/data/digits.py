"""scikit-learn's bundled handwritten digits: the embedded default (no download)."""

from __future__ import annotations

import jax
import numpy as np

from rtjax.data.dataset import Dataset, DatasetSpec, split_by_seed
from rtjax.data.registry import register


def _digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 8, 8, 1) float32 in [0, 1] and int32 labels."""
  from sklearn.datasets import load_digits  # ~0.8 s: only when loaded
  bunch = load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  return images, bunch.target.astype(np.int32)


def _to_32x32x3(images: np.ndarray) -> np.ndarray:
  """Bilinear 8x8 -> 32x32, grey repeated on 3 channels: CIFAR-shaped digits."""
  resized = jax.image.resize(images, (len(images), 32, 32, 1), "bilinear")
  return np.repeat(np.asarray(resized, np.float32), 3, axis=-1)


def check(data_config, require) -> None:
  """The bundled digits have no test split of their own: test_fraction."""
  test = data_config.test_fraction
  require(0.0 < test < 1.0, "test_fraction", f"must be in (0, 1), got {test}")
  require(data_config.val_fraction + test < 1.0, "val_fraction",
          "val_fraction + test_fraction must leave training data")


def _split(name: str, images: np.ndarray, labels: np.ndarray, data_config,
           seed: int) -> Dataset:
  """Test split first, then val from the rest."""
  test_fraction = data_config.test_fraction
  rest, test = split_by_seed(images, labels, test_fraction, seed)
  val_of_rest = data_config.val_fraction / (1.0 - test_fraction)
  train, val = split_by_seed(rest.images, rest.labels, val_of_rest, seed + 1)
  return Dataset(name, train, val, test, num_classes=10)


@register(DatasetSpec("digits", (8, 8, 1), 10), check)
def load(data_config, seed: int) -> Dataset:
  """The 8x8 grey digits as bundled."""
  return _split("digits", *_digit_images(), data_config, seed)


@register(DatasetSpec("digits32", (32, 32, 3), 10), check)
def load32(data_config, seed: int) -> Dataset:
  """CIFAR-shaped digits: the same images and splits at 32x32x3."""
  images, labels = _digit_images()
  return _split("digits32", _to_32x32x3(images), labels, data_config, seed)
