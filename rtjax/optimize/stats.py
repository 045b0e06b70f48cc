"""The statistics a decision between two classifiers needs: a 95% interval
for an accuracy and a paired test on the same examples, so that a 0.3-point
difference on 1,000 test examples is not called a loss (or a win) when it is
noise. Plain math, no scipy: the exact tests are short."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, total: int, z: float = Z95
                    ) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion: unlike the normal
  interval it stays inside [0, 1] and keeps its coverage at 100% accuracy,
  which small digits test sets reach."""
  if total <= 0:
    return 0.0, 1.0
  p = correct / total
  denom = 1 + z * z / total
  center = (p + z * z / (2 * total)) / denom
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
  # At 0% or 100% one end is exactly 0 or 1 (rounding aside).
  low = 0.0 if correct == 0 else max(0.0, center - half)
  high = 1.0 if correct == total else min(1.0, center + half)
  return low, high


def mcnemar(reference_correct: np.ndarray, other_correct: np.ndarray) -> dict:
  """Exact two-sided McNemar test on paired outcomes: only the examples the
  two models disagree on carry information; under 'equally accurate' each
  such example favours either model with probability 1/2.

  Returns the discordant counts (`only_reference`: the reference right and
  the other wrong; `only_other`: the reverse) and the p-value."""
  a = np.asarray(reference_correct, bool)
  b = np.asarray(other_correct, bool)
  if a.shape != b.shape:
    raise ValueError(f"paired outcomes differ in shape: {a.shape} vs {b.shape}")
  only_ref, only_other = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n, k = only_ref + only_other, min(only_ref, only_other)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n if n else 1.0
  return {"only_reference": only_ref, "only_other": only_other,
          "p_value": min(1.0, 2 * tail)}


def paired_difference_interval(reference_correct: np.ndarray,
                               other_correct: np.ndarray, z: float = Z95
                               ) -> tuple[float, float]:
  """95% interval of accuracy(other) - accuracy(reference) on the same
  examples (the paired normal interval of the per-example differences)."""
  d = (np.asarray(other_correct, float) - np.asarray(reference_correct, float))
  n = len(d)
  if n < 2:
    return -1.0, 1.0
  half = z * float(np.std(d, ddof=1)) / math.sqrt(n)
  return float(d.mean()) - half, float(d.mean()) + half


def compare_to_reference(reference_correct, other_correct,
                         alpha: float = 0.05) -> dict:
  """Everything the report says about one candidate against the parent:
  accuracy with its interval, the change with its interval and McNemar's
  p-value, and whether the change is significant at `alpha`."""
  other = np.asarray(other_correct, bool)
  ref = np.asarray(reference_correct, bool)
  low, high = wilson_interval(int(other.sum()), len(other))
  d_low, d_high = paired_difference_interval(ref, other)
  test = mcnemar(ref, other)
  return {"accuracy": float(other.mean()), "ci95": [low, high],
          "change": float(other.mean() - ref.mean()),
          "change_ci95": [d_low, d_high], **test,
          "significant": test["p_value"] < alpha}
