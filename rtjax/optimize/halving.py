"""Successive halving under a time limit (Jamieson & Talwalkar 2016): every
candidate gets a short fine-tune, the better half (by validation accuracy;
never fewer than the finalists to be measured) a longer one, and so on; the
last planned rung's survivors are the finalists, each at its rung of best
validation accuracy. A lone survivor goes on through the remaining rungs:
halving picks whom to train, never how long the time limit allows.

Time is counted from what the store recorded (seconds of each finished job
and phase), so a resumed search counts the time already spent, and every
decision is recorded, so a resumed search replays it instead of deciding
again with another clock: the same measurements give the same finalists.
A job is started only when its estimated duration (a fixed cost per job
and a cost per step, fitted to the jobs so far) fits in what is left of
the budget; time left after the planned rungs trains the finalists longer.
From the last planned rung on, a job that does not fit whole is cut to the
time left rather than skipped.

A student trained from scratch learns slower at first than a candidate
that starts from trained weights, so until it has trained a given number
of steps it is promoted without taking a place among the others: it is
judged once it has had the time to learn.

One place among the survivors can be reserved for the candidate predicted
to fit the budget with the widest margin: the budget is set again from the
parent's final runs, and a budget that moves down (a ViT search's fell 23%,
below every finalist ranked by accuracy) still finds that one under it.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from rtjax.optimize.store import SearchStore


def spent_seconds(store: SearchStore) -> float:
  """Seconds of every recorded phase and job."""
  return (sum(store.get("phase_seconds", {}).values())
          + sum(v["seconds"] for k, v in store.data.items()
                if k.startswith("job/")))


def _line(jobs: Sequence[dict]) -> tuple[float, float] | None:
  """(seconds per job, seconds per step) fitted to jobs of at least two
  lengths, neither negative; None with fewer lengths."""
  if len({j["steps"] for j in jobs}) < 2:
    return None
  slope, start = np.polyfit([j["steps"] for j in jobs],
                            [j["seconds"] for j in jobs], 1)
  if slope <= 0:  # noise: no step cost to be seen
    return None
  return max(float(start), 0.0), float(slope)


def _estimate(store: SearchStore, name: str, steps: int) -> float:
  """Seconds a job of `steps` steps will take: a fixed cost per job
  (compiling the train step, evaluating, saving: in a ViT search a
  200-step job took 13 s and a 600-step one 16 s) plus a cost per step,
  fitted to the candidate's own jobs when they have two lengths; with one,
  its fixed cost is what the steps of the others' fits do not explain;
  with none, the others' median seconds per step."""
  jobs = {k: v for k, v in store.data.items() if k.startswith("job/")}
  own = [v for k, v in jobs.items() if k.startswith(f"job/{name}/")]
  if line := _line(own):
    return line[0] + line[1] * steps
  names = {k.split("/")[1] for k in jobs}
  fits = [_line([v for k, v in jobs.items() if k.startswith(f"job/{n}/")])
          for n in names]
  slopes = [fit[1] for fit in fits if fit]
  if own and slopes:
    slope = float(np.median(slopes))
    start = np.median([max(j["seconds"] - slope * j["steps"], 0.0)
                       for j in own])
    return float(start) + slope * steps
  pool = own or list(jobs.values())
  if not pool:
    return 0.0
  return steps * float(np.median([v["seconds"] / v["steps"] for v in pool]))


def best_rung(store: SearchStore, name: str) -> int | None:
  """The trained rung of `name` with the best validation accuracy, ties to
  the later rung (each rung restarts the schedule, so a longer one can end
  worse); None if it trained none."""
  scores, k = [], 0
  while f"job/{name}/rung{k}" in store:
    scores.append((store.get(f"job/{name}/rung{k}")["val_accuracy"], k))
    k += 1
  return max(scores)[1] if scores else None


def _steps_within(store: SearchStore, name: str, seconds: float) -> int:
  """The most steps whose job is estimated to end within `seconds`."""
  start, per_step = _estimate(store, name, 0), _estimate(store, name, 1)
  per_step -= start
  return int((seconds - start) / per_step) if per_step > 0 else 0


def _train_rung(names: Sequence[str], k: int, steps: int,
                train: Callable[[str, int, int], dict], store: SearchStore,
                clock: Callable[[], float], budget_s: float,
                fill_from: int | None = None) -> bool:
  """Trains rung `k` of each name not trained yet, while its estimated
  duration fits in the time left (or, with `fill_from`, as many steps as
  fit when that is at least `fill_from`); True when one did not fit."""
  for name in names:
    job = f"job/{name}/rung{k}"
    if job in store:
      continue
    left = budget_s - spent_seconds(store)
    if _estimate(store, name, steps) > left:
      fit = _steps_within(store, name, left)
      if fill_from is None or fit < fill_from:
        return True
      steps = fit
    start = clock()
    result = train(name, k, steps)
    store.put(job, {**result, "steps": steps,
                    "seconds": max(clock() - start, 1e-9)})
  return False


def ranked(names: Sequence[str], accuracy: Mapping[str, float],
           first: str | None, fits: Collection[str],
           predicted: Mapping[str, float]) -> list[str]:
  """The order candidates are promoted in: `first` (the reserved place),
  then those predicted to fit the budget by accuracy, then the others
  closest to the budget (`predicted` ms) first."""
  return sorted(names, key=lambda n: (
      n != first, n not in fits, 0.0 if n in fits else predicted.get(n, 0.0),
      -accuracy.get(n, -1.0)))


def successive_halving(names: Sequence[str], rungs: Sequence[int],
                       train: Callable[[str, int, int], dict],
                       store: SearchStore, clock: Callable[[], float],
                       budget_s: float, *, eta: int, max_finalists: int,
                       extra_rungs: int, fits: Collection[str] = (),
                       predicted: Mapping[str, float] | None = None,
                       scratch: Collection[str] = (),
                       scratch_min_steps: int = 0,
                       reserved: str | None = None) -> dict[str, int]:
  """{finalist: its rung of best validation accuracy} (best_rung).
  `train(name, rung, steps)` returns at least {'val_accuracy'}; its
  duration is measured with `clock`. After the planned rungs, while time
  is left, the finalists train up to `extra_rungs` more rungs of `eta`
  times the steps each (no halving).

  Candidates in `fits` (predicted to meet the latency budget) rank ahead
  of the others, by validation accuracy: after a short rung the most
  pruned candidates, often the only ones fast enough, have not yet
  recovered their accuracy, and accuracy alone would drop them first. The
  others rank by their `predicted` latency, closest to the budget first
  (then by accuracy): the likeliest to fit when measured again. Students
  in `scratch` that have trained fewer than `scratch_min_steps` steps in
  all are promoted past every halving rung but the last planned one.
  `reserved` keeps one of the places at every rung, when there are at
  least two (the widest predicted margin)."""
  first = reserved if max_finalists >= 2 else None
  survivors, planned, trained_steps = list(names), len(rungs), 0
  for k in range(planned + extra_rungs):
    steps = rungs[k] if k < planned else rungs[-1] * eta ** (k - planned + 1)
    trained_steps += steps
    if f"rung{k}" not in store:
      out_of_time = _train_rung(survivors, k, steps, train, store, clock,
                                budget_s, rungs[0] if k >= planned - 1
                                else None)
      trained = [n for n in survivors if f"job/{n}/rung{k}" in store]
      order = ranked(trained, {n: store.get(f"job/{n}/rung{k}")[
          "val_accuracy"] for n in trained}, first, fits, predicted or {})
      protected = [n for n in order if n in scratch
                   and trained_steps < scratch_min_steps]
      if k >= planned - 1:  # the finalists; later rungs only train longer
        protected = []
        promoted = (order[:max_finalists] if k == planned - 1 else
                    sorted(survivors, key=lambda n: n not in order))
      else:  # never fewer than the finalists the last rung will keep
        order = [n for n in order if n not in protected]
        promoted = order[:max(max_finalists, math.ceil(len(order) / eta))]
      store.put(f"rung{k}", {
          "trained": trained, "promoted": promoted + protected,
          "protected": protected, "reserved": first in promoted,
          "out_of_time": out_of_time,
          "final": out_of_time or k == planned + extra_rungs - 1,
          "steps": steps})
    decision = store.get(f"rung{k}")
    if not decision["trained"]:  # no time for this rung: keep the last one
      survivors = survivors[:max_finalists]
      break
    survivors = decision["promoted"]
    if decision["final"]:
      break
  return {n: k for n in survivors if (k := best_rung(store, n)) is not None}
