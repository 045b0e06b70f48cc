"""Training batches as a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from rtjax.data.dataset import Split


def shift_and_flip(inputs: np.ndarray, rng: np.random.Generator,
                   max_shift: int, random_flip: bool) -> np.ndarray:
  """Random translation by up to `max_shift` steps along every axis between
  batch and channels (zero fill), optional flip of the last such axis: the
  same augmentation for (B, H, W, C) images (width flipped) and (B, T, C)
  sequences (time flipped). Images draw exactly what they always did, so
  existing runs see the same batches. (B,) and (B, C) inputs have no such
  axis and pass unchanged."""
  if inputs.ndim < 3:
    return inputs
  batch, *spatial, _ = inputs.shape
  ones = (1,) * len(spatial)
  if max_shift > 0:
    padded = np.pad(inputs, ((0, 0), *[(max_shift, max_shift)] * len(spatial),
                             (0, 0)))
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(spatial), batch))
    index = [np.arange(batch).reshape(batch, *ones)]
    for axis, (size, offset) in enumerate(zip(spatial, offsets)):
      steps = np.arange(size).reshape(ones[:axis] + (size,) + ones[axis + 1:])
      index.append(offset.reshape(batch, *ones) + steps)
    inputs = padded[tuple(index)]
  if random_flip:
    flip = rng.random(batch) < 0.5
    inputs = np.where(flip.reshape(batch, *ones, 1),
                      np.flip(inputs, axis=-2), inputs)
  return inputs


class TrainBatches:
  """batch(step): epoch-wise shuffles (dropping the remainder) plus augmentation."""

  def __init__(self, split: Split, batch_size: int, seed: int,
               max_shift: int = 0, random_flip: bool = False):
    if batch_size > len(split):
      raise ValueError(f"train.batch_size {batch_size} is larger than the "
                       f"training split ({len(split)} examples)")
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.max_shift, self.random_flip = max_shift, random_flip
    self.steps_per_epoch = len(split) // batch_size
    self._epoch, self._order = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._order = epoch, rng.permutation(len(self.split))
    return self._order

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, index = divmod(step, self.steps_per_epoch)
    start = index * self.batch_size
    rows = self._permutation(epoch)[start:start + self.batch_size]
    inputs = self.split.images[rows]
    rng = np.random.default_rng([self.seed, step, 1])
    inputs = shift_and_flip(inputs, rng, self.max_shift, self.random_flip)
    return inputs, self.split.labels[rows]


def eval_batches(split: Split, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Fixed-shape batches (last one zero-padded) with a mask of the real rows."""
  for start in range(0, len(split), batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    real = len(labels)
    pad = batch_size - real
    mask = np.concatenate([np.ones(real, bool), np.zeros(pad, bool)])
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]),
                                                images.dtype)])
      labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]),
                                                labels.dtype)])
    yield images, labels, mask
