"""Did the machine change under the search? The parent is measured in
several phases (screening, the final runs, the rivals' runs), each time in
several interleaved runs whose spread is the noise that phase measured.
When the parent's latency moved between two phases by more than that
noise, the later phase is measured once more; if it moves again, the
search says so: latencies from the two phases are then not comparable.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")


def spread(row: dict) -> float | None:
  """The relative range of a row's per-run percentile latencies, None
  with fewer than two runs."""
  runs = row.get("p_ms_runs") or []
  if len(runs) < 2:
    return None
  return (max(runs) - min(runs)) / float(np.median(runs))


def moved(before: dict, after: dict) -> bool:
  """Whether `after`'s p_ms differs from `before`'s by more than the
  larger spread of their runs (no spread measured: never)."""
  noises = [n for n in (spread(before), spread(after)) if n is not None]
  if not noises:
    return False
  return abs(after["p_ms"] - before["p_ms"]) > max(noises) * before["p_ms"]


def steady(measure: Callable[[], T], parent_of: Callable[[T], dict],
           reference: dict | None) -> tuple[T, dict | None]:
  """(measure(), None), or when the parent's row in it moved from
  `reference`, (measure() again, what happened): 'settled' when the
  second measurement did not move."""
  first = measure()
  if reference is None or not moved(reference, parent_of(first)):
    return first, None
  again = measure()
  note = {"reference_ms": reference["p_ms"],
          "first_ms": parent_of(first)["p_ms"],
          "again_ms": parent_of(again)["p_ms"],
          "noise": max(n for n in (spread(reference), spread(parent_of(first)),
                                   spread(parent_of(again))) if n is not None),
          "settled": not moved(reference, parent_of(again))}
  return again, note


def describe(phase: str, reference_phase: str, note: dict,
             percentile: float) -> str:
  """One sentence for the report."""
  p = f"p{percentile:g}"
  text = (f"{phase}: the parent's {p} moved from {note['reference_ms']:.4g} "
          f"ms ({reference_phase}) to {note['first_ms']:.4g} ms, beyond the "
          f"spread of its runs ({100 * note['noise']:.1f}%); measured again: "
          f"{note['again_ms']:.4g} ms")
  if note["settled"]:
    return text + ", back within the noise."
  return (text + ", moved again: the machine's speed changed between the "
          "phases, so their latencies are not comparable.")
