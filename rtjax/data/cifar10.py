"""CIFAR-10 from the standard python pickle batches, in a local or gs:// directory."""

from __future__ import annotations

import pickle

import numpy as np
from etils import epath

from rtjax.data.dataset import Dataset, Split, split_by_seed

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel statistics of the CIFAR-10 training set, for normalization.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _read_batch(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  with path.open("rb") as f:
    batch = pickle.load(f, encoding="bytes")
  data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
  images = data.transpose(0, 2, 3, 1).astype(np.float32) / 255.0
  return (images - MEAN) / STD, np.asarray(batch[b"labels"], np.int32)


def _read_split(directory: epath.Path, names) -> Split:
  parts = [_read_batch(directory / name) for name in names]
  return Split(np.concatenate([p[0] for p in parts]),
               np.concatenate([p[1] for p in parts]))


def load(directory: str, val_fraction: float, seed: int) -> Dataset:
  """Train/val from data_batch_1..5 (val held out by seed), test from test_batch."""
  if not directory:
    raise FileNotFoundError(
        "cifar10 needs data.dir: set --config.data.dir to the directory "
        "holding the python batches (cifar-10-batches-py)")
  root = epath.Path(directory)
  expected = (*TRAIN_FILES, TEST_FILE)
  missing = [name for name in expected if not (root / name).exists()]
  if missing:
    raise FileNotFoundError(
        f"cifar10: {directory} is missing {', '.join(missing)}; it must hold "
        f"the CIFAR-10 python batches {', '.join(expected)} "
        "(the cifar-10-batches-py folder of cifar-10-python.tar.gz)")
  full_train = _read_split(root, TRAIN_FILES)
  train, val = split_by_seed(full_train.images, full_train.labels,
                             val_fraction, seed)
  return Dataset("cifar10", train, val, _read_split(root, [TEST_FILE]),
                 num_classes=10)
