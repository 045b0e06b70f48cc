"""Continuous batching over a decoding engine's slots, as JetStream's
orchestrator does it: waiting requests are prefilled (earliest first-token
deadline first) into free slots, one generate step advances every active
slot, and a slot is freed the step its request ends (a stop string, its
token limit, the context), is cancelled or loses its client.

Policy: while slots are generating, at most `prefills_per_step` prompts are
prefilled between two generate steps, so a running stream's time per token
stays within one step plus that many prefills; with no slot generating,
every free slot is filled at once. (`static=True` is static batching
instead, the baseline continuous batching beats: a batch is prefilled only
when every slot is free, so it waits for its longest member.) Admission is
decided when a request arrives: it is refused (Rejected 'queue_full') when
`max_queue` requests already wait, or (Rejected 'deadline') when its first
token cannot arrive
by its deadline, estimated from the measured prefill and step times and
the slots the running requests free at their token limits.

`run` drives a scheduler on the caller's thread; a server starts one on a
thread of its own (`start`), and callbacks then arrive on that thread.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import threading
import time
from typing import Callable, Sequence

import numpy as np

from rtjax.infer.batcher import Rejected
from rtjax.infer.engine import Engine
from rtjax.infer.generation import Completion, Request, Running

@dataclasses.dataclass(eq=False)
class Stream:
  """One request in the scheduler: `on_text(text)` gets its decided text as
  it grows, `on_end(completion)` once when it ends (finish_reason 'stop',
  'length' or 'cancelled'); `deadline`: when its first token must arrive
  (perf_counter seconds, math.inf for none)."""
  request: Request
  prompt: np.ndarray
  deadline: float
  on_text: Callable[[str], None]
  on_end: Callable[[Completion], None]
  completion: Completion
  admitted: float = 0.0  # perf_counter seconds
  prefilled_at: float = math.nan  # when its prefill started (queue time)
  cancelled_at_step: int = -1  # the scheduler's step count then; -1: not
  ended_at_step: int = -1

  @property
  def cancelled(self) -> bool:
    return self.cancelled_at_step >= 0


def measure_times(engine: Engine, calls: int = 5) -> tuple[dict, float]:
  """(prefill seconds per bucket, generate-step seconds): medians of
  `calls` each after one untimed, every slot busy in the step (also what
  warms an engine up)."""
  prefill = {}
  for bucket in engine.buckets:
    prompt = np.zeros(min(bucket, engine.context - 1), np.int32)
    times = []
    for _ in range(calls + 1):
      start = time.perf_counter()
      engine.prefill(prompt)
      times.append(time.perf_counter() - start)
    prefill[bucket] = float(np.median(times[1:]))
  filled = engine.prefill(np.zeros(1, np.int32))
  for slot in engine.free_slots:
    engine.insert(filled, slot)
  times = []
  for _ in range(calls + 1):
    start = time.perf_counter()
    engine.generate()
    times.append(time.perf_counter() - start)
  for slot in range(engine.slots):
    engine.free(slot)
  return prefill, float(np.median(times[1:]))


class Scheduler:
  """Streams through `engine`'s slots (see the module docstring).
  `prefill_s` ({bucket: seconds}) and `step_s` estimate first-token times
  for admission (measure_times); without them every request is admitted.
  `observe(stream)` sees every stream that ends (metrics)."""

  def __init__(self, engine: Engine, prefills_per_step: int = 1,
               max_queue: int = 256, prefill_s: dict | None = None,
               step_s: float | None = None,
               observe: Callable[[Stream], None] = lambda stream: None,
               static: bool = False):
    self.engine, self.prefills_per_step = engine, max(1, prefills_per_step)
    self.max_queue, self.prefill_s, self.step_s = max_queue, prefill_s, step_s
    self.observe, self.static = observe, static
    self._waiting: list[tuple[float, int, Stream]] = []  # a heap by deadline
    self._order = itertools.count()
    self._running: dict[int, tuple[Stream, Running]] = {}
    self._cancelled: list[Stream] = []  # since the last step
    self._lock = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.steps = 0  # generate steps so far

  # ---- what callers use ------------------------------------------------------

  def submit(self, request: Request, deadline: float = math.inf,
             on_text: Callable[[str], None] = lambda text: None,
             on_end: Callable[[Completion], None] = lambda c: None) -> Stream:
    """Queues a request; raises InputError for a prompt the engine cannot
    take, Rejected when it is not admitted."""
    prompt = self.engine.encode(request.prompt)
    self.engine.check_prompt(prompt)
    now = time.perf_counter()
    stream = Stream(request, prompt, deadline, on_text, on_end,
                    Completion(request, arrived=now), admitted=now)
    with self._lock:
      if self._stopping:
        raise Rejected("stopping", "the server is shutting down")
      if len(self._waiting) >= self.max_queue:
        raise Rejected("queue_full", f"{len(self._waiting)} requests wait")
      expected = self.first_token_at(stream, now)
      if expected > deadline:
        raise Rejected("deadline", f"its first token is expected in "
                       f"{(expected - now) * 1e3:.1f} ms, after its deadline "
                       f"({(deadline - now) * 1e3:.1f} ms)")
      heapq.heappush(self._waiting, (deadline, next(self._order), stream))
      self._lock.notify()
    return stream

  def cancel(self, stream: Stream) -> None:
    """Ends the stream at the next step (its slot freed, on_end called with
    finish_reason 'cancelled'); nothing when it has ended."""
    with self._lock:
      stream.cancelled_at_step = self.steps
      self._cancelled.append(stream)
      self._lock.notify()

  @property
  def slots_in_use(self) -> int:
    return len(self._running)

  @property
  def queued(self) -> int:
    return len(self._waiting)

  @property
  def cache_fill(self) -> float:
    """Positions the active slots hold over all the slots' positions."""
    held = sum(len(s.prompt) + len(s.completion.tokens)
               for s, _ in list(self._running.values()))
    return held / (self.engine.slots * self.engine.context)

  def first_token_at(self, stream: Stream, now: float) -> float:
    """When the stream's first token is expected if queued now: requests
    with earlier deadlines go first, each into the next slot to free (a
    running one frees at its token limit), after a prefill and, while
    others generate, a step; -inf without measured times."""
    if self.prefill_s is None or self.step_s is None:
      return -math.inf
    frees = [now] * (self.engine.slots - len(self._running)) + [
        now + self.step_s * (min(s.request.max_tokens, running.room)
                             - len(s.completion.tokens))
        for s, running in list(self._running.values())]
    heapq.heapify(frees)
    ahead = sorted([s for _, _, s in self._waiting if s.deadline
                    <= stream.deadline], key=lambda s: s.deadline)
    ready = now
    for queued in ahead + [stream]:
      start = max(heapq.heappop(frees), ready)
      ready = start + self._prefill_time(len(queued.prompt)) + self.step_s
      heapq.heappush(frees, ready + self.step_s * queued.request.max_tokens)
    return ready

  def _prefill_time(self, length: int) -> float:
    offset, total = 0, 0.0
    while offset < length:
      bucket = self.engine.piece(offset, length - offset)
      total, offset = total + self.prefill_s[bucket], offset + bucket
    return total

  # ---- the loop ----------------------------------------------------------------

  def step(self) -> bool:
    """Ends cancelled streams, prefills waiting ones into free slots, then
    one generate step; False when there was nothing to do."""
    with self._lock:
      cancelled, self._cancelled = self._cancelled, []
      gone = ([w[2] for w in self._waiting if w[2].cancelled] if cancelled
              else [])  # the queue is scanned only after a cancel
      if gone:
        self._waiting = [w for w in self._waiting if not w[2].cancelled]
        heapq.heapify(self._waiting)
    for stream in gone:
      self._end(stream, "cancelled")
    for slot, (stream, _) in list(self._running.items()) if cancelled else ():
      if stream.cancelled:
        self._free(slot, "cancelled")
    budget = (self.engine.slots if not self._running
              else 0 if self.static else self.prefills_per_step)
    for slot in self.engine.free_slots[:budget]:
      with self._lock:
        if not self._waiting:
          break
        _, _, stream = heapq.heappop(self._waiting)
      self._prefill(stream, slot)
    if not self._running:
      return bool(cancelled)
    gained = self.engine.generate()
    self.steps += 1
    now = time.perf_counter()
    for slot, (stream, running) in list(self._running.items()):
      if any(self._took(stream, running, token, now)
             for token in gained[slot]):
        self._free(slot, "")
    return True

  def _prefill(self, stream: Stream, slot: int) -> None:
    stream.prefilled_at = time.perf_counter()
    running = Running(self.engine, stream.completion, stream.prompt)
    prefilled = self.engine.prefill(stream.prompt, stream.request.sampling)
    if self._took(stream, running, prefilled.token, time.perf_counter()):
      self._end(stream, "")
    else:
      self.engine.insert(prefilled, slot)
      self._running[slot] = (stream, running)

  def _took(self, stream: Stream, running: Running, token: int,
            now: float) -> bool:
    ended = running.add(token, now)
    text = running.decided()
    if text:
      stream.on_text(text)
    return ended

  def _free(self, slot: int, reason: str) -> None:
    stream, _ = self._running.pop(slot)
    self.engine.free(slot)
    self._end(stream, reason)

  def _end(self, stream: Stream, reason: str) -> None:
    if reason:
      stream.completion.finish_reason = reason
    stream.ended_at_step = self.steps
    self.observe(stream)
    stream.on_end(stream.completion)

  def idle(self) -> bool:
    return not self._waiting and not self._running

  # ---- on a thread of its own ----------------------------------------------

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    name="generation-scheduler")
    self._thread.start()

  def _loop(self) -> None:
    while True:
      with self._lock:
        while self.idle() and not self._stopping:
          self._lock.wait()
        if self.idle() and self._stopping:
          return
      self.step()

  def stop(self, timeout: float | None = None) -> None:
    """Admits nothing more, lets every admitted stream finish (within
    `timeout` seconds), then ends the thread."""
    with self._lock:
      self._stopping = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout)


def run(engine: Engine, requests: Sequence[Request],
        on_text: Callable[[int, str], None] | None = None
        ) -> list[Completion]:
  """Every request to its end through the engine's slots, on this thread
  (all arrive now; those beyond the free slots wait for one, filled as
  soon as one frees; every prompt is checked as it is queued, before any
  runs). `on_text(index, text)` gets each request's decided text as it
  grows."""
  scheduler = Scheduler(engine, prefills_per_step=engine.slots,
                        max_queue=len(requests))
  streams = [scheduler.submit(
      r, on_text=(lambda text, i=i: on_text(i, text)) if on_text
      else (lambda text: None)) for i, r in enumerate(requests)]
  while not scheduler.idle():
    scheduler.step()
  return [s.completion for s in streams]
