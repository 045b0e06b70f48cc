"""Stopping at a step boundary when the machine is being taken away.

Cloud TPU preemption sends SIGTERM. With several processes, each host hears
it on its own, so the decision to stop must be collective: jax.distributed's
preemption sync manager (its own SIGTERM handler, shared through the
coordinator) answers True on every process at the same sync point, and all
of them save that step and exit. Its contract, measured on CPU with gloo:
every process must ask at every iteration with the same increasing counter,
counted from 1 in each launch (a resumed run that asked about its global
step could miss a notice that arrived before its first step), and nothing
else may ask (orbax's manager would, hence rtjax.checkpoint's override).
Installing a Python SIGTERM handler after jax.distributed.initialize would
replace jax's and leave the other hosts unaware, so a single process alone
(where jax's answer is always False) gets one: it sets a flag.
"""

from __future__ import annotations

import signal
import threading
import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  """Context manager; `reached()` says whether to save and stop now."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._iteration = 0

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping",
                    signum)
    self._signalled = True

  def reached(self) -> bool:
    """Call once per training step on every process."""
    self._iteration += 1
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(self._iteration)
    return self._signalled

  def __enter__(self) -> "Preemption":
    # One process: our handler. Several: jax's preemption notifier owns
    # SIGTERM, and replacing its handler would leave the other hosts unaware.
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
