"""In-memory classification datasets with deterministic splits; inputs are
channels-last arrays of any rank: (N, H, W, C) images, (N, T, C) sequences."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's inputs and labels. `images` keeps its name for its callers
  but holds inputs of any rank: (N, H, W, C) images or (N, T, C) sequences."""
  images: np.ndarray  # (N, *input_shape) float32
  labels: np.ndarray  # (N,) int32

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset declares without loading: one example's shape and dtype
  and the number of classes (of a token dataset: its vocabulary size, and
  the vocabulary itself, token i being its i-th character). It has the
  attributes a model is built from, as a loaded Dataset has."""
  name: str
  input_shape: tuple[int, ...]
  num_classes: int
  dtype: str = "float32"
  vocabulary: str = ""


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int
  vocabulary: str = ""  # a token dataset's: token i is its i-th character

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape: (H, W, C) for images, (T, C) for sequences."""
    return tuple(int(d) for d in self.train.images.shape[1:])

  @property
  def spec(self) -> DatasetSpec:
    return DatasetSpec(self.name, self.input_shape, self.num_classes,
                       str(self.train.images.dtype), self.vocabulary)

  def describe(self) -> dict:
    """What a checkpoint records so a consumer can rebuild the same data."""
    return {"name": self.name, "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "sizes": {"train": len(self.train), "val": len(self.val),
                      "test": len(self.test)},
            **({"vocabulary": self.vocabulary} if self.vocabulary else {})}


def split_by_seed(images: np.ndarray, labels: np.ndarray, fraction: float,
                  seed: int) -> tuple[Split, Split]:
  """Stratified split: the same (data, fraction, seed) always gives the same sets."""
  if fraction <= 0:
    empty = Split(images[:0], labels[:0])
    return Split(images, labels), empty
  # Imported here: scikit-learn takes ~0.8 s to import and every command
  # imports this module, most of them to read a checkpoint, not to split.
  from sklearn.model_selection import train_test_split
  keep_x, held_x, keep_y, held_y = train_test_split(
      images, labels, test_size=fraction, random_state=seed, stratify=labels)
  return Split(keep_x, keep_y), Split(held_x, held_y)
