"""The one timing primitive of every harness, so that latency tables, conv
lowering choices, peer ratios, machine peaks and LoadGen's expectations all
count a call's seconds the same way.

A leaf module (no jax, no rtjax): each call given must block until its
result is ready (jax callers end it with block_until_ready).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import time
from typing import Callable, Hashable, Iterator, Mapping

_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30  # linux/prctl.h


def time_calls(calls: Mapping[Hashable, Callable[[], object]], iters: int,
               warmup: int = 0, block: int = 1, settle: int = 0,
               budget_s: float | None = None, max_iters: int = 200,
               settle_s: float = 0.0) -> dict[Hashable, list[float]]:
  """Seconds of each call, timed with time.perf_counter.

  After `warmup` untimed calls of each (in turns: A, B, A, B, ...), the
  calls take turns by blocks of untimed calls (at least `settle` of them
  and `settle_s` seconds) then `block` timed calls, so machine noise hits
  them alike and a call's leftover work (a runtime's spinning threads)
  lands in the next one's untimed calls. Turns go on until each call has
  at least `iters` timed calls (whole blocks), then, with a `budget_s`,
  while all timed seconds total under it and each call has fewer than
  `max_iters`.

  Python's garbage collector is off while it times, as in timeit: a
  collection triggered by allocations anywhere in the process would land
  in whichever call happened to be running, a tail no model change moves."""
  collecting = gc.isenabled()
  gc.disable()
  try:
    return _time_calls(calls, iters, warmup, block, settle, budget_s,
                       max_iters, settle_s)
  finally:
    if collecting:
      gc.enable()


def _time_calls(calls, iters, warmup, block, settle, budget_s, max_iters,
                settle_s):
  times = {name: [] for name in calls}
  for _ in range(warmup):
    for call in calls.values():
      call()
  timed, spent = 0, 0.0
  while timed < iters or (budget_s is not None and spent < budget_s
                          and timed < max_iters):
    for name, call in calls.items():
      untimed, until = 0, time.perf_counter() + settle_s
      while untimed < settle or time.perf_counter() < until:
        call()
        untimed += 1
      for _ in range(block):
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        times[name].append(seconds)
        spent += seconds
    timed += block
  return times


@contextlib.contextmanager
def realtime_threads(switch_interval_s: float = 5e-4) -> Iterator[None]:
  """Thread settings of a process that answers requests against a deadline,
  for the threads it runs meanwhile (those it starts inherit them):

  * Python lets another thread take the interpreter every
    `switch_interval_s` instead of 5 ms, which would let one thread (an
    event loop, LoadGen's issuer) hold off the model's for a deadline;
  * on Linux, a timer slack of 1 ns: a sleeping thread wakes when asked
    instead of up to 50 us later (the default lets the kernel batch wakeups;
    in a one-off probe on the 2-core CPU, a 1 ms sleep overshot by 74 us
    at p50 with it, 25 us without). LoadGen sleeps until each query's
    scheduled time and counts the overshoot in the query's latency."""
  interval = sys.getswitchinterval()
  sys.setswitchinterval(switch_interval_s)
  prctl = (ctypes.CDLL(None, use_errno=True).prctl
           if sys.platform.startswith("linux") else None)
  slack = prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0) if prctl else -1
  if slack > 0:
    prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
  try:
    yield
  finally:
    if slack > 0:
      prctl(_PR_SET_TIMERSLACK, slack, 0, 0, 0)
    sys.setswitchinterval(interval)
