"""CIFAR-10 from the standard python pickle batches, in a local or gs:// directory."""

from __future__ import annotations

import pickle

import numpy as np
from etils import epath

from rtjax.data.dataset import Dataset, DatasetSpec, Split, split_by_seed
from rtjax.data.registry import register
from rtjax.errors import DataError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# Per-channel statistics of the CIFAR-10 training set, for normalization.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
_REDOWNLOAD = ("replace it with the file of the same name from the "
               "cifar-10-batches-py folder of cifar-10-python.tar.gz")


def _read_batch(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  """One python batch: normalized NHWC float images and int labels. Any way
  the file fails to be one (truncated, not a pickle, another structure) is a
  DataError naming the file."""
  try:
    with path.open("rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except OSError as e:
    raise DataError(f"cifar10: cannot read {path} ({e}); check the path and "
                    "its permissions") from None
  except (pickle.UnpicklingError, EOFError, AttributeError, ImportError,
          IndexError, KeyError, TypeError, ValueError, OverflowError) as e:
    # What pickle raises on a truncated file, a non-pickle or a pickle of
    # classes that do not exist here.
    raise DataError(f"cifar10: {path} is not a readable python batch "
                    f"({type(e).__name__}: {e}); {_REDOWNLOAD}") from None
  if not isinstance(batch, dict):
    raise DataError(f"cifar10: {path} holds a {type(batch).__name__}, not a "
                    f"batch dict with b'data' and b'labels'; {_REDOWNLOAD}")
  missing = [repr(key) for key in (b"data", b"labels") if key not in batch]
  if missing:
    raise DataError(f"cifar10: {path} has no {' or '.join(missing)} key "
                    f"(keys: {', '.join(map(repr, batch))}); {_REDOWNLOAD}")
  try:
    data = np.asarray(batch[b"data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
      raise ValueError(f"b'data' has shape {data.shape}, expected "
                       "(examples, 3072)")
    labels = np.asarray(batch[b"labels"], np.int32)
    if labels.shape != (data.shape[0],):
      raise ValueError(f"b'labels' has shape {labels.shape}, expected "
                       f"({data.shape[0]},) to match b'data'")
  except (ValueError, TypeError, OverflowError) as e:
    raise DataError(f"cifar10: {path} is not a CIFAR-10 python batch ({e}); "
                    f"{_REDOWNLOAD}") from None
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  images = images.astype(np.float32) / 255.0
  return (images - MEAN) / STD, labels


def _read_split(directory: epath.Path, names) -> Split:
  parts = [_read_batch(directory / name) for name in names]
  return Split(np.concatenate([p[0] for p in parts]),
               np.concatenate([p[1] for p in parts]))


@register(DatasetSpec("cifar10", (32, 32, 3), 10))
def load(data_config, seed: int) -> Dataset:
  """Train/val from data_batch_1..5 (val held out by seed), test from
  test_batch, in data.dir."""
  directory, val_fraction = data_config.dir, data_config.val_fraction
  expected = (*TRAIN_FILES, TEST_FILE)
  if not directory:
    raise DataError(
        "cifar10 needs data.dir, which is empty; set --config.data.dir to the "
        "directory holding the python batches (cifar-10-batches-py)")
  root = epath.Path(directory)
  if not root.exists():
    raise DataError(
        f"cifar10: data.dir {directory} does not exist; set --config.data.dir "
        "to the cifar-10-batches-py folder of cifar-10-python.tar.gz, which "
        f"holds {', '.join(expected)}")
  if not root.is_dir():
    raise DataError(
        f"cifar10: data.dir {directory} is a file, not a directory; set "
        "--config.data.dir to the cifar-10-batches-py folder")
  missing = [name for name in expected if not (root / name).exists()]
  if missing:
    raise DataError(
        f"cifar10: data.dir {directory} is missing {', '.join(missing)}; it "
        f"must hold the CIFAR-10 python batches {', '.join(expected)} "
        "(the cifar-10-batches-py folder of cifar-10-python.tar.gz)")
  # Every file is read (and checked) before any work is done with them.
  full_train = _read_split(root, TRAIN_FILES)
  test = _read_split(root, [TEST_FILE])
  train, val = split_by_seed(full_train.images, full_train.labels,
                             val_fraction, seed)
  return Dataset("cifar10", train, val, test, num_classes=10)
