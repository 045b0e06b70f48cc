"""MLPerf LoadGen around an rtjax serving function: SingleStream (p90
latency), Server (Poisson arrivals at a target QPS, p99 against a deadline,
and a search for the highest QPS that meets it) and Offline (throughput).

The Server and Offline SUT batches dynamically: it collects queries up to
`max_batch` rows or `max_wait_ms`, pads them to a compiled bucket and answers
each query once; SingleStream queries are answered on LoadGen's thread.
LoadGen's own logs stay in the output directory; the results are read from
the `:::MLLOG` JSON lines of its detail log.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from typing import Callable

import mlperf_loadgen as lg
import numpy as np
from etils import epath

from rtjax.infer import CompiledModel
from rtjax.timing import time_calls

SCENARIOS = {"SingleStream": lg.TestScenario.SingleStream,
             "Server": lg.TestScenario.Server,
             "Offline": lg.TestScenario.Offline}


class DynamicBatcher:
  """Queries in, one response per query out, batched on a worker thread."""

  def __init__(self, model: Callable[[np.ndarray], np.ndarray],
               samples: np.ndarray, respond: Callable[[list], None],
               max_batch: int, max_wait_ms: float):
    self.model, self.samples, self.respond = model, samples, respond
    self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
    self._queue: queue.Queue = queue.Queue()
    self._worker = threading.Thread(target=self._run, daemon=True)
    self._worker.start()

  def submit(self, queries) -> None:
    """queries: objects with .id and .index (LoadGen QuerySample)."""
    for q in queries:
      self._queue.put(q)

  def stop(self) -> None:
    self._queue.put(None)
    self._worker.join()

  def _run(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      batch, deadline = [first], time.perf_counter() + self.max_wait_s
      stop = False
      while len(batch) < self.max_batch:
        try:
          item = self._queue.get(timeout=max(deadline - time.perf_counter(), 0))
        except queue.Empty:
          break
        if item is None:
          stop = True
          break
        batch.append(item)
      outputs = self.model(self.samples[[q.index for q in batch]])
      self.respond(list(zip(batch, outputs)))
      if stop:
        return


def _respond_to_loadgen(pairs) -> None:
  responses, keep = [], []
  for query, row in pairs:
    row = np.ascontiguousarray(row, np.float32)
    keep.append(row)  # alive until LoadGen has copied it
    responses.append(lg.QuerySampleResponse(
        query.id, row.__array_interface__["data"][0], row.nbytes))
  lg.QuerySamplesComplete(responses)


# Output key -> the `:::MLLOG` key of mlperf_log_detail.txt that holds it;
# keys a scenario does not log are left out (SingleStream and Offline log
# no scheduled/completed rate, only Offline a samples_per_second).
DETAIL_KEYS = {
    "result": "result_validity",
    "scenario": "effective_scenario",
    "samples_per_second": "result_samples_per_second",
    "scheduled_samples_per_second": "result_scheduled_samples_per_sec",
    "completed_samples_per_second": "result_completed_samples_per_sec",
    "p50_latency_ns": "result_50.00_percentile_latency_ns",
    "p90_latency_ns": "result_90.00_percentile_latency_ns",
    "p99_latency_ns": "result_99.00_percentile_latency_ns",
    "target_latency_ns": "effective_target_latency_ns",
    "target_qps": "effective_target_qps",
}


def parse_detail(text: str) -> dict:
  """The fields that judge a run, from mlperf_log_detail.txt's `:::MLLOG
  {json}` lines: keys LoadGen keeps stable, unlike the summary's layout."""
  logged = {}
  for line in text.splitlines():
    if line.startswith(":::MLLOG "):
      entry = json.loads(line.removeprefix(":::MLLOG "))
      logged[entry["key"]] = entry["value"]
  return {key: value if isinstance(value, str) else float(value)
          for key, mllog in DETAIL_KEYS.items()
          if (value := logged.get(mllog)) is not None}


@dataclasses.dataclass
class LoadGenConfig:
  scenario: str = "SingleStream"
  min_duration_ms: int = 0  # 0: LoadGen's defaults (real runs)
  min_query_count: int = 0
  target_qps: float = 100.0  # Server
  target_latency_ms: float = 10.0  # Server deadline
  max_batch: int = 64  # dynamic batcher
  max_wait_ms: float = 2.0


def expectations(model: Callable[[np.ndarray], np.ndarray],
                 samples: np.ndarray, max_batch: int, calls: int = 50
                 ) -> tuple[float, float]:
  """(fastest batch-1 latency in s, throughput at max_batch in samples/s
  from its fastest call): what LoadGen must expect to issue enough queries.
  It pre-generates queries for the minimum duration at that rate and calls
  the run INVALID if they run out early, so the fastest call, not the
  median, is the safe estimate."""
  # One block of `calls` each: all batch-1 calls, then all max_batch ones.
  times = time_calls({"one": lambda: model(samples[:1]),
                      "max_batch": lambda: model(samples[:max_batch])},
                     calls, block=calls)
  return min(times["one"]), max_batch / min(times["max_batch"])


def run(model: CompiledModel, samples: np.ndarray, config: LoadGenConfig,
        output_dir: epath.PathLike) -> dict:
  """One LoadGen performance run; returns its detail log's results (+ log
  dir)."""
  output_dir = epath.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  settings = lg.TestSettings()
  settings.scenario = SCENARIOS[config.scenario]
  settings.mode = lg.TestMode.PerformanceOnly
  settings.server_target_qps = config.target_qps
  settings.server_target_latency_ns = int(config.target_latency_ms * 1e6)
  latency_s, throughput = expectations(model, samples, config.max_batch)
  settings.single_stream_expected_latency_ns = max(int(latency_s * 1e9), 1)
  settings.offline_expected_qps = throughput
  if config.min_duration_ms:
    settings.min_duration_ms = config.min_duration_ms
    settings.max_duration_ms = 4 * config.min_duration_ms
  if config.min_query_count:
    settings.min_query_count = config.min_query_count
  if config.scenario == "SingleStream":
    # One query in flight: answered on LoadGen's own thread, no hand-off.
    issue = lambda queries: _respond_to_loadgen(list(zip(
        queries, model(samples[[q.index for q in queries]]))))
    stop = lambda: None
  else:
    batcher = DynamicBatcher(model, samples, _respond_to_loadgen,
                             config.max_batch, config.max_wait_ms)
    issue, stop = batcher.submit, batcher.stop
  sut = lg.ConstructSUT(issue, lambda: None)
  qsl = lg.ConstructQSL(len(samples), len(samples), lambda _: None,
                        lambda _: None)
  log = lg.LogSettings()
  log.log_output.outdir = str(output_dir)
  log.log_output.copy_summary_to_stdout = False
  try:
    lg.StartTestWithLogSettings(sut, qsl, settings, log)
  finally:
    stop()
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)
  results = parse_detail((output_dir / "mlperf_log_detail.txt").read_text())
  results["log_dir"] = str(output_dir)
  return results


def find_peak_server_qps(model: CompiledModel, samples: np.ndarray,
                         config: LoadGenConfig, output_dir: epath.PathLike,
                         low: float = 0.0, high: float | None = None,
                         steps: int = 6) -> dict:
  """Bisects the Server target QPS: the highest VALID one within `steps` runs.
  `high` defaults to the model's throughput at the largest batch, which no
  Server run can exceed."""
  output_dir = epath.Path(output_dir)
  if high is None:
    high = expectations(model, samples, config.max_batch)[1]
  best = None
  for i in range(steps):
    qps = (low + high) / 2
    result = run(model, samples, dataclasses.replace(
        config, scenario="Server", target_qps=qps), output_dir / f"qps_{i}")
    if result.get("result") == "VALID":
      best, low = {**result, "target_qps": qps}, qps
    else:
      high = qps
  return {"peak_valid_qps": best["target_qps"] if best else None,
          "last_valid": best, "searched": [low, high]}
