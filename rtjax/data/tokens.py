"""Characters <-> token ids of a character vocabulary (token i is the
vocabulary's i-th character), the one mapping training, generation and
serving share."""

from __future__ import annotations

import numpy as np


def encode(vocabulary: str, text: str) -> np.ndarray:
  """int32 token ids of `text`; ValueError naming the first character the
  vocabulary lacks."""
  index = {c: i for i, c in enumerate(vocabulary)}
  missing = next((c for c in text if c not in index), None)
  if missing is not None:
    raise ValueError(f"character {missing!r} is not in the vocabulary of "
                     f"{len(vocabulary)} characters")
  return np.fromiter((index[c] for c in text), np.int32, len(text))


def decode(vocabulary: str, tokens) -> str:
  return "".join(vocabulary[int(t)] for t in np.asarray(tokens).ravel())


def windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
  """Next-token examples of a token stream: (inputs, targets), each
  (N, context), from consecutive windows of context + 1 tokens (targets are
  the inputs shifted by one; no window crosses the stream's end)."""
  count = (len(tokens) - 1) // context
  starts = np.arange(count) * context
  rows = tokens[starts[:, None] + np.arange(context + 1)]
  return rows[:, :-1], rows[:, 1:]
