"""Character n-gram models: the baselines a language model's bits per
character is read against, counted on the training split.

Order 1 is the add-one unigram. Higher orders interpolate absolute
discounting (Ney et al. 1994, the discount 0.75 Kneser-Ney uses) down to
it: P(c | h) = max(n(h, c) - d, 0) / n(h) + d * N1+(h) / n(h) * P(c | h'),
with h' the context one character shorter, and P(c | h') alone for a
context never seen. Vectorised with numpy over integer codes of
(context, character), so a 5-gram over the plays counts in seconds.
"""

from __future__ import annotations

import numpy as np

DISCOUNT = 0.75


def _codes(tokens: np.ndarray, k: int, vocab: int) -> np.ndarray:
  """For each position t >= k: the code of its k preceding tokens."""
  code = np.zeros(len(tokens) - k, np.int64)
  for i in range(k):
    code = code * vocab + tokens[i:len(tokens) - k + i]
  return code


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray
            ) -> np.ndarray:
  """counts[keys == query] per query (0 where absent); keys sorted."""
  at = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
  return np.where(keys[at] == query, counts[at], 0)


def bits_per_token(train: np.ndarray, test: np.ndarray, order: int,
                   vocab: int) -> float:
  """Mean -log2 P(test token | its order - 1 predecessors) of the n-gram
  model counted on `train`."""
  return float(-np.mean(np.log2(probabilities(train, test, order, vocab))))


def probabilities(train: np.ndarray, test: np.ndarray, order: int,
                  vocab: int) -> np.ndarray:
  """P(test[t] | its order - 1 predecessors) for every t; the first
  order - 1 tokens with the predecessors they have."""
  train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
  counts = np.bincount(train, minlength=vocab)
  p = (counts[test] + 1.0) / (len(train) + vocab)
  for k in range(1, order):
    context = _codes(train, k, vocab)
    pair_keys, pair_counts = np.unique(context * vocab + train[k:],
                                       return_counts=True)
    context_keys, context_counts = np.unique(context, return_counts=True)
    kinds_keys, kinds = np.unique(pair_keys // vocab, return_counts=True)
    test_context = _codes(test, k, vocab)
    n_h = _lookup(context_keys, context_counts, test_context).astype(float)
    n_hc = _lookup(pair_keys, pair_counts, test_context * vocab + test[k:])
    seen = n_h > 0
    n1 = _lookup(kinds_keys, kinds, test_context).astype(float)
    lower = p[k:]
    safe = np.where(seen, n_h, 1.0)
    mixed = (np.maximum(n_hc - DISCOUNT, 0.0) / safe
             + DISCOUNT * n1 / safe * lower)
    p = np.concatenate([p[:k], np.where(seen, mixed, lower)])
  return p
