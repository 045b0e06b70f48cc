"""SIGTERM (what Cloud TPU preemption sends) becomes a flag the loop polls,
so the run saves a checkpoint at a step boundary and exits cleanly."""

from __future__ import annotations

import signal
import threading

from absl import logging


class PreemptionGuard:
  """Context manager: while active, SIGTERM sets `requested` instead of killing."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.requested = True

  def __enter__(self) -> "PreemptionGuard":
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
