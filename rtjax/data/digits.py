"""scikit-learn's bundled handwritten digits: the embedded default (no download)."""

from __future__ import annotations

import jax
import numpy as np
from sklearn.datasets import load_digits

from rtjax.data.dataset import Dataset, split_by_seed


def _digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 8, 8, 1) float32 in [0, 1] and int32 labels."""
  bunch = load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  return images, bunch.target.astype(np.int32)


def _to_32x32x3(images: np.ndarray) -> np.ndarray:
  """Bilinear 8x8 -> 32x32, grey repeated on 3 channels: CIFAR-shaped digits."""
  resized = jax.image.resize(images, (len(images), 32, 32, 1), "bilinear")
  return np.repeat(np.asarray(resized, np.float32), 3, axis=-1)


def load(name: str, val_fraction: float, test_fraction: float,
         seed: int) -> Dataset:
  """`digits` (8x8x1) or `digits32` (32x32x3); test split first, then val from the rest."""
  images, labels = _digit_images()
  if name == "digits32":
    images = _to_32x32x3(images)
  rest, test = split_by_seed(images, labels, test_fraction, seed)
  val_of_rest = val_fraction / (1.0 - test_fraction)
  train, val = split_by_seed(rest.images, rest.labels, val_of_rest, seed + 1)
  return Dataset(name, train, val, test, num_classes=10)
