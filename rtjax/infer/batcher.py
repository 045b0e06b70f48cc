"""A deadline-aware batcher in front of a model compiled for batch buckets:
requests in, one answer (or an immediate rejection) per request out.

The server (rtjax.serve) and the LoadGen SUT (rtjax.bench.loadgen) share it.
Its policy:

* dispatch at once when idle: a request that finds the model free and no
  queue runs at once, alone, on the smallest bucket that holds it. When
  arrivals are sparse (the model has been idle for longer than the call
  takes) and the call is short (under `inline_s`), it runs on the submitting
  thread itself: handing it to another thread and back would cost more than
  the call. When they are dense, the caller stays free to bring the next
  arrivals while the worker thread runs the model;
* while a batch runs, arrivals queue; when it ends, the worker thread takes a
  FIFO prefix of the queue and runs it on the bucket that serves the most
  rows per second (measured service time per bucket, kept current with every
  batch) among the buckets that keep every taken request, and the next
  batch's first, within its deadline;
* a bounded queue and admission control: a request whose estimated answer
  time (the running batch's end, then the queue ahead of it drained in
  largest buckets) is past its deadline is rejected at once, and so is one
  found unable to make it when its turn comes. Arrival order rather than
  earliest-deadline-first keeps every admitted request's estimate valid: a
  later arrival never pushes an admitted one back;
* the caller's host work for the next batch (the server's parsing and
  encoding on its event loop) overlaps the running one: the model's call
  releases the interpreter while it computes.

Times are time.perf_counter() seconds.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import math
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from rtjax.infer.compiled import bucket_for
from rtjax.timing import time_calls

REASONS = ("deadline", "queue_full", "stopping")


class Rejected(Exception):
  """A request not admitted (or dropped from the queue); `.reason` is one of
  REASONS, the message says why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(eq=False)
class Request:
  """`inputs`: (rows, *input shape); `deadline`: when it must be answered
  (perf_counter seconds, math.inf for none); `tag`: the caller's handle."""
  inputs: np.ndarray
  deadline: float = math.inf
  tag: object = None
  arrival: float = dataclasses.field(default_factory=time.perf_counter)

  @property
  def rows(self) -> int:
    return len(self.inputs)


def measure_service_times(run: Callable[[np.ndarray], np.ndarray],
                          buckets: Sequence[int], input_shape: Sequence[int],
                          dtype=np.float32, calls: int = 20,
                          warmup: int = 3) -> dict[int, float]:
  """Median seconds of `run` per bucket on zeros, after `warmup` calls each
  (which is also what warms a server up)."""
  inputs = {b: np.zeros((b, *input_shape), dtype) for b in buckets}
  times = time_calls({b: (lambda b=b: run(inputs[b])) for b in buckets},
                     calls, warmup=warmup)
  return {b: float(np.median(t)) for b, t in times.items()}


class DeadlineBatcher:
  """`run(inputs)` takes exactly a bucket's rows and returns one output row
  per input row. `respond(pairs)` gets [(request, its output rows)] once per
  batch, on the thread that ran it; `reject(request, error)` each request
  dropped from the queue (a Rejected) or in a batch whose `run` raised (that
  exception). submit raises Rejected itself for a request not admitted.

  `admission=False` admits everything and answers late requests late (a
  LoadGen run must answer every query); deadlines still steer the buckets.
  Admission adds `headroom` to the estimated drain time, so that batches a
  little slower than measured do not turn admitted requests into late
  rejections.
  `on_batch(rows, bucket, seconds)` observes every batch (metrics)."""

  def __init__(self, run: Callable[[np.ndarray], np.ndarray],
               service_s: Mapping[int, float],
               respond: Callable[[list], None],
               reject: Callable[[Request, Exception], None] | None = None,
               max_queue_rows: int = 4096, admission: bool = True,
               on_batch: Callable[[int, int, float], None] | None = None,
               inline_s: float = 1e-3, adapt: float = 0.1,
               headroom: float = 0.1):
    self.run, self.respond = run, respond
    self.reject = reject or (lambda request, error: None)
    self.on_batch = on_batch or (lambda rows, bucket, seconds: None)
    self.buckets = sorted(int(b) for b in service_s)
    self.service_s = {b: float(service_s[b]) for b in self.buckets}
    self.max_rows = self.buckets[-1]
    self.max_queue_rows, self.admission = max_queue_rows, admission
    self.inline_s, self.adapt, self.headroom = inline_s, adapt, headroom
    self._queue: collections.deque[Request] = collections.deque()
    self._queued_rows = 0
    self._busy = False  # a batch is running (on the worker or inline)
    self._busy_until = 0.0  # its expected end; when idle, the last one's end
    self._stopping = False
    self._cond = threading.Condition()
    self._worker = threading.Thread(target=self._work, daemon=True,
                                    name="batcher")
    self._worker.start()

  # ---- estimates --------------------------------------------------------

  def bucket_for(self, rows: int) -> int:
    return bucket_for(self.buckets, rows)

  def drain_seconds(self, rows: int) -> float:
    """Time to serve `rows` queued rows in full largest buckets plus one."""
    full, rest = divmod(rows, self.max_rows)
    return (full * self.service_s[self.max_rows]
            + (self.service_s[self.bucket_for(rest)] if rest else 0.0))

  @property
  def queued_rows(self) -> int:
    return self._queued_rows

  # ---- the caller's side ------------------------------------------------

  def submit(self, request: Request) -> None:
    """Queues (or runs) `request`, or raises Rejected at once."""
    if not 1 <= request.rows <= self.max_rows:
      raise ValueError(f"{request.rows} rows: a request holds 1 to "
                       f"{self.max_rows} (the largest bucket)")
    with self._cond:
      if self._stopping:
        raise Rejected("stopping", "the server is shutting down")
      rows = self._queued_rows + request.rows
      now = time.perf_counter()
      if self.admission:
        if rows > self.max_queue_rows:
          raise Rejected("queue_full", f"queue full ({self._queued_rows} "
                         f"rows waiting, at most {self.max_queue_rows})")
        start = max(now, self._busy_until) if self._busy else now
        done = start + self.drain_seconds(rows) * (1 + self.headroom)
        if done > request.deadline:
          raise Rejected("deadline", f"cannot answer within the deadline: "
                         f"{(request.deadline - request.arrival) * 1e3:.1f} ms "
                         f"asked, {(done - request.arrival) * 1e3:.1f} ms "
                         f"expected with {self._queued_rows} rows queued")
      bucket = self.bucket_for(request.rows)
      seconds = self.service_s[bucket]
      inline = (not self._busy and not self._queue and seconds <= self.inline_s
                and now - self._busy_until > seconds)
      if inline:
        self._busy, self._busy_until = True, now + seconds
      else:
        self._queue.append(request)
        self._queued_rows = rows
        self._cond.notify()
    if inline:
      self._execute([request], request.rows, bucket)

  def stop(self) -> None:
    """Refuses new requests, answers every queued one, then returns."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    self._worker.join()

  # ---- running batches ---------------------------------------------------

  def _execute(self, batch: list[Request], rows: int, bucket: int) -> None:
    """Runs and answers one batch (the caller set _busy), then frees the
    model for the worker."""
    inputs = [r.inputs for r in batch]
    if rows < bucket:
      inputs.append(np.zeros((bucket - rows, *batch[0].inputs.shape[1:]),
                             batch[0].inputs.dtype))
    start = time.perf_counter()
    try:
      outputs = np.asarray(self.run(np.concatenate(inputs) if len(inputs) > 1
                                    else inputs[0]))
    except Exception as e:  # this batch fails, the batcher goes on
      outputs = e
    seconds = time.perf_counter() - start
    with self._cond:
      self._busy, self._busy_until = False, time.perf_counter()
      if not isinstance(outputs, Exception):
        self.service_s[bucket] += self.adapt * (seconds
                                                - self.service_s[bucket])
      if self._queue or self._stopping:
        self._cond.notify()
    if isinstance(outputs, Exception):
      for request in batch:
        self.reject(request, outputs)
      return
    pairs, first = [], 0
    for request in batch:
      pairs.append((request, outputs[first:first + request.rows]))
      first += request.rows
    self.respond(pairs)
    self.on_batch(rows, bucket, seconds)

  def _work(self) -> None:
    while True:
      with self._cond:
        while self._busy or not (self._queue or self._stopping):
          self._cond.wait()
        if not self._queue:
          return  # stopping, everything answered
        now = time.perf_counter()
        late = self._drop_late(now) if self.admission else []
        took = bool(self._queue)
        if took:
          bucket, count = self._choose(now)
          batch = [self._queue.popleft() for _ in range(count)]
          rows = sum(r.rows for r in batch)
          self._queued_rows -= rows
          self._busy, self._busy_until = True, now + self.service_s[bucket]
      for request, error in late:
        self.reject(request, error)
      if took:
        self._execute(batch, rows, bucket)

  def _drop_late(self, now: float) -> list:
    """Takes from the head the requests that cannot make it even alone on
    the smallest bucket that holds them (lock held); [(request, Rejected)]."""
    late = []
    while self._queue:
      request = self._queue[0]
      if now + self.service_s[self.bucket_for(request.rows)] <= request.deadline:
        break
      self._queue.popleft()
      self._queued_rows -= request.rows
      late.append((request, Rejected(
          "deadline", f"its deadline passed while queued "
          f"({(request.deadline - request.arrival) * 1e3:.1f} ms asked)")))
    return late

  def _choose(self, now: float) -> tuple[int, int]:
    """(bucket, requests to take) for the queue's head at `now`."""
    head = list(itertools.islice(self._queue, 2 * self.max_rows))
    cumulative, earliest, rows, soonest = [], [], 0, math.inf
    for request in head:
      rows += request.rows
      soonest = min(soonest, request.deadline)
      cumulative.append(rows)
      earliest.append(soonest)
    best, best_rate, fallback, previous = None, -1.0, None, 0
    for bucket in self.buckets:
      count = bisect.bisect_right(cumulative, bucket)
      if count == previous:  # no more rows than a smaller bucket: only
        continue  # padding, faster only by the noise in its timing
      previous = count
      taken, seconds = cumulative[count - 1], self.service_s[bucket]
      rate = taken / seconds
      if fallback is None or rate > fallback[2]:
        fallback = (bucket, count, rate)
      finish = now + seconds
      if finish > earliest[count - 1]:
        continue
      if count < len(head):  # the next batch's first must still make it
        after = bisect.bisect_right(cumulative, taken + self.max_rows)
        following = cumulative[after - 1] - taken
        if finish + self.service_s[self.bucket_for(following)] > head[
            count].deadline:
          continue
      if rate > best_rate:
        best, best_rate = (bucket, count), rate
    return best if best is not None else fallback[:2]  # else catch up fastest
