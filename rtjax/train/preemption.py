"""Stopping at a step boundary when the machine is being taken away.

Cloud TPU preemption sends SIGTERM. With several processes, each host hears
it on its own, so the decision to stop must be collective: orbax's
`reached_preemption(step)` (jax.distributed's preemption sync manager)
answers True on every process at the same step, and all of them save that
step and exit. A single process has no such service (it answers False when
jax.distributed is not initialised): there a SIGTERM handler sets a flag.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import jax
from absl import logging


class Preemption:
  """Context manager; `reached(step)` says whether to save and stop now."""

  def __init__(self, reached_sync_point: Callable[[int], bool]):
    """`reached_sync_point(step)`: the collective check (multi-process)."""
    self._sync_point = reached_sync_point
    self._signalled = False
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping",
                    signum)
    self._signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._sync_point(step)  # every process must call it every step
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
