"""In-memory image classification datasets with deterministic splits."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.model_selection import train_test_split


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # (N, H, W, C) float32
  labels: np.ndarray  # (N,) int32

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.train.images.shape[1:])

  def describe(self) -> dict:
    """What a checkpoint records so a consumer can rebuild the same data."""
    return {"name": self.name, "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "sizes": {"train": len(self.train), "val": len(self.val),
                      "test": len(self.test)}}


def split_by_seed(images: np.ndarray, labels: np.ndarray, fraction: float,
                  seed: int) -> tuple[Split, Split]:
  """Stratified split: the same (data, fraction, seed) always gives the same sets."""
  if fraction <= 0:
    empty = Split(images[:0], labels[:0])
    return Split(images, labels), empty
  keep_x, held_x, keep_y, held_y = train_test_split(
      images, labels, test_size=fraction, random_state=seed, stratify=labels)
  return Split(keep_x, keep_y), Split(held_x, held_y)
