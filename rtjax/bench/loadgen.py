"""MLPerf LoadGen around an rtjax serving function: SingleStream (p90
latency), Server (Poisson arrivals at a target QPS, p99 against a deadline,
and a search for the highest QPS that meets it) and Offline (throughput),
in process or through a running model server (experiments.serve).

In process, SingleStream queries are answered on LoadGen's thread; Server
and Offline queries go through rtjax.infer.batcher.DeadlineBatcher (the
server's own batcher) with the Server deadline as each query's deadline and
every query admitted; queries LoadGen issues together (all of Offline's,
the Server's that are due at once) travel as requests of up to max_batch
rows and are answered in one call per batch. Over the network
(`server_url`), queries travel as Open Inference Protocol binary-tensor
requests (rtjax.bench.remote); a run in which the server refused any
query is INVALID. LoadGen's own logs stay in the output directory; the
results are read from the `:::MLLOG` JSON lines of its detail log.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from typing import Callable

import mlperf_loadgen as lg
import numpy as np
from etils import epath

from rtjax.bench.remote import Refused, RemoteModel
from rtjax.infer import CompiledModel
from rtjax.infer.batcher import DeadlineBatcher, Request, measure_service_times
from rtjax.timing import realtime_threads, time_calls

SCENARIOS = {"SingleStream": lg.TestScenario.SingleStream,
             "Server": lg.TestScenario.Server,
             "Offline": lg.TestScenario.Offline}
NO_OUTPUT = np.zeros((1, 0), np.float32)  # one row of nothing


def _respond_to_loadgen(pairs) -> None:
  """[(LoadGen queries, their output rows, one per query)] answered in one
  call to LoadGen, each query pointing at its row of one contiguous copy."""
  responses, keep = [], []
  for queries, rows in pairs:
    rows = np.ascontiguousarray(rows, np.float32)
    keep.append(rows)  # alive until LoadGen has copied it
    address, row_bytes = rows.__array_interface__["data"][0], rows[0].nbytes
    responses.extend(lg.QuerySampleResponse(query.id, address + i * row_bytes,
                                            row_bytes)
                     for i, query in enumerate(queries))
  lg.QuerySamplesComplete(responses)


def buckets_for(model, max_batch: int) -> list[int]:
  """The model's compiled batch sizes up to max_batch (powers of two for a
  plain function)."""
  sizes = getattr(model, "batch_sizes", None) or [
      2 ** i for i in range(max_batch.bit_length())]
  return [b for b in sizes if b <= max_batch] or [min(sizes)]


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
    # With token latencies (text generation): Server logs TTFT and TPOT
    # percentiles and completed tokens/s, Offline tokens/s.
    "ttft_p50_ns": "result_first_token_50.00_percentile_latency_ns",
    "ttft_p99_ns": "result_first_token_99.00_percentile_latency_ns",
    "tpot_p50_ns": "result_time_per_output_token_50.00_percentile_ns",
    "tpot_p99_ns": "result_time_per_output_token_99.00_percentile_ns",
    "completed_tokens_per_second": "result_completed_tokens_per_second",
    "tokens_per_second": "result_tokens_per_second",
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
  max_batch: int = 64  # largest bucket the batcher forms
  server_url: str = ""  # "": in process; else the server to send queries to
  model_name: str = ""  # the model's name on that server
  # LoadGen's accuracy mode: every sample once, each answer's bytes logged
  # in mlperf_log_accuracy.json (what the answers were), no timing result.
  accuracy: bool = False


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


def _in_process_sut(model, samples: np.ndarray, config: LoadGenConfig):
  """(issue, stop, stats) answering queries in this process. stats() gives
  the p50 and p99 of the time each query spent inside the SUT (from
  LoadGen's call to its answer): what LoadGen's latency adds beyond it is
  LoadGen's own lateness in issuing."""
  inside = []

  def stats():
    if not inside:
      return {}
    ms = np.asarray(inside) * 1e3
    return {"sut_p50_ms": float(np.percentile(ms, 50)),
            "sut_p99_ms": float(np.percentile(ms, 99))}

  if config.scenario == "SingleStream":
    def issue(queries):  # one query in flight: answered on LoadGen's thread
      start = time.perf_counter()
      _respond_to_loadgen([(queries, model(samples[[q.index
                                                    for q in queries]]))])
      inside.append(time.perf_counter() - start)
    return issue, lambda: None, stats

  def respond(pairs):
    _respond_to_loadgen([(r.tag, out) for r, out in pairs])
    done = time.perf_counter()
    inside.extend(done - r.arrival for r, _ in pairs for _ in r.tag)

  buckets = buckets_for(model, config.max_batch)
  batcher = DeadlineBatcher(
      model, measure_service_times(model, buckets, samples.shape[1:]),
      respond, admission=False)
  budget_s = (config.target_latency_ms / 1e3 if config.scenario == "Server"
              else math.inf)

  def issue(queries):
    # Queries LoadGen issues together (Offline's all, the Server's coalesced
    # when due at once) go as requests of up to max_batch rows: fewer Python
    # calls per query (with this and server_coalesce_queries, LeNet-5's
    # Server peak went from 58% to 75% of Offline, medians of 3 runs of the
    # README's serving command).
    now = time.perf_counter()
    for first in range(0, len(queries), config.max_batch):
      group = queries[first:first + config.max_batch]
      batcher.submit(Request(samples[[q.index for q in group]],
                             now + budget_s, group, now))
  return issue, batcher.stop, stats


def _network_sut(samples: np.ndarray, config: LoadGenConfig):
  """(issue, stop, stats) sending each query to the server at
  config.server_url; stats() counts refused queries and raises the first
  transport error."""
  remote = RemoteModel(config.server_url, config.model_name)
  refused, failed = [], []

  def answer(query, result):
    if isinstance(result, Exception):
      (refused if isinstance(result, Refused) else failed).append(result)
      result = NO_OUTPUT
    _respond_to_loadgen([([query], result)])

  def stats():
    if failed:
      raise failed[0]
    return {"refused_queries": len(refused)}

  if config.scenario == "SingleStream":
    def issue(queries):
      for q in queries:
        try:
          result = remote.call(samples[q.index:q.index + 1])
        except Exception as e:  # counted by stats()
          result = e
        answer(q, result)
    return issue, lambda: None, stats
  remote.start()

  def issue(queries):
    for q in queries:
      remote.submit(samples[q.index:q.index + 1], functools.partial(answer, q))
  return issue, remote.stop, stats


def run(model: CompiledModel, samples: np.ndarray, config: LoadGenConfig,
        output_dir: epath.PathLike,
        expected: tuple[float, float] | None = None) -> dict:
  """One LoadGen performance run; returns its detail log's results (+ log
  dir, and over the network the number of queries the server refused).
  `expected`: the model's expectations(), when already measured."""
  output_dir = epath.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  settings = lg.TestSettings()
  settings.scenario = SCENARIOS[config.scenario]
  settings.mode = (lg.TestMode.AccuracyOnly if config.accuracy
                   else lg.TestMode.PerformanceOnly)
  settings.server_target_qps = config.target_qps
  settings.server_target_latency_ns = int(config.target_latency_ms * 1e6)
  # Queries already due when LoadGen's issuing thread wakes come in one call
  # (as Triton's and MLPerf submitters' SUTs take them); each query's
  # latency still runs from its own scheduled time.
  settings.server_coalesce_queries = True
  latency_s, throughput = expected or expectations(model, samples,
                                                   config.max_batch)
  settings.single_stream_expected_latency_ns = max(int(latency_s * 1e9), 1)
  settings.offline_expected_qps = throughput
  if config.min_duration_ms:
    settings.min_duration_ms = config.min_duration_ms
    # Room for min_query_count queries at a low Server rate too: LoadGen
    # stops issuing at max_duration and calls such a run INVALID.
    needed_ms = (1000 * config.min_query_count / config.target_qps
                 if config.scenario == "Server" else 0)
    settings.max_duration_ms = int(max(4 * config.min_duration_ms,
                                       2 * needed_ms))
  if config.min_query_count:
    settings.min_query_count = config.min_query_count
  log = lg.LogSettings()
  log.log_output.outdir = str(output_dir)
  log.log_output.copy_summary_to_stdout = False
  # LoadGen's threads, the batcher's and the network client's are started
  # inside, with a real-time process's thread settings.
  with realtime_threads():
    issue, stop, stats = (_network_sut(samples, config) if config.server_url
                          else _in_process_sut(model, samples, config))
    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(len(samples), len(samples), lambda _: None,
                          lambda _: None)
    try:
      lg.StartTestWithLogSettings(sut, qsl, settings, log)
    finally:
      stop()
      lg.DestroyQSL(qsl)
      lg.DestroySUT(sut)
  results = parse_detail((output_dir / "mlperf_log_detail.txt").read_text())
  results.update(stats())
  if results.get("refused_queries"):  # answered early, not served
    results["result"] = "INVALID"
  results["log_dir"] = str(output_dir)
  return results


def find_peak_server_qps(model: CompiledModel, samples: np.ndarray,
                         config: LoadGenConfig, output_dir: epath.PathLike,
                         low: float = 0.0, high: float | None = None,
                         steps: int = 6,
                         expected: tuple[float, float] | None = None) -> dict:
  """Bisects the Server target QPS: the highest VALID one within `steps` runs.
  `high` defaults to the model's throughput at the largest batch, which no
  Server run can exceed."""
  output_dir = epath.Path(output_dir)
  expected = expected or expectations(model, samples, config.max_batch)
  high = high or expected[1]
  best = None
  for i in range(steps):
    qps = (low + high) / 2
    result = run(model, samples, dataclasses.replace(
        config, scenario="Server", target_qps=qps), output_dir / f"qps_{i}",
                 expected)
    if result.get("result") == "VALID":
      best, low = {**result, "target_qps": qps}, qps
    else:
      high = qps
  return {"peak_valid_qps": best["target_qps"] if best else None,
          "last_valid": best, "searched": [low, high]}


def profile(model: CompiledModel, samples: np.ndarray, config: LoadGenConfig,
            output_dir: epath.PathLike, scenarios: list[str],
            find_peak: bool = False, low_load: float = 0.1,
            steps: int = 6, high: float | None = None) -> dict:
  """One repetition on one path: each scenario, then (find_peak) the Server
  peak, bisected up to `high`, else the Offline samples/s of this
  repetition when it ran, and a Server run at `low_load` x that peak (the
  latency an idle server adds)."""
  output_dir = epath.Path(output_dir)
  expected = expectations(model, samples, config.max_batch)
  results = {scenario: run(model, samples, dataclasses.replace(
      config, scenario=scenario), output_dir / scenario, expected)
             for scenario in scenarios}
  if find_peak:
    high = high or results.get("Offline", {}).get("samples_per_second")
    results["server_peak"] = find_peak_server_qps(
        model, samples, config, output_dir / "peak", high=high, steps=steps,
        expected=expected)
    peak = results["server_peak"]["peak_valid_qps"]
    if peak:
      results["server_low_load"] = run(model, samples, dataclasses.replace(
          config, scenario="Server", target_qps=low_load * peak),
          output_dir / "low_load", expected)
  return results


def _figures(result: dict) -> dict:
  """The numbers that judge one repetition (ms, QPS, ratios), as far as it
  has them."""
  get = lambda scenario, key: result.get(scenario, {}).get(key)
  ms = lambda ns: ns / 1e6 if ns is not None else None
  figures = {
      "offline_samples_per_s": get("Offline", "samples_per_second"),
      "single_p50_ms": ms(get("SingleStream", "p50_latency_ns")),
      "single_p90_ms": ms(get("SingleStream", "p90_latency_ns")),
      "single_p99_ms": ms(get("SingleStream", "p99_latency_ns")),
      "server_p99_ms": ms(get("Server", "p99_latency_ns")),
      # A bisection that found no VALID rate: 0, not a missing figure.
      "peak_qps": (result["server_peak"]["peak_valid_qps"] or 0.0
                   if "server_peak" in result else None),
      "low_load_qps": get("server_low_load", "target_qps"),
      "low_load_p50_ms": ms(get("server_low_load", "p50_latency_ns")),
      "low_load_valid": get("server_low_load", "result"),
      "single_sut_p50_ms": get("SingleStream", "sut_p50_ms"),
      "low_load_sut_p50_ms": get("server_low_load", "sut_p50_ms"),
  }
  if figures["peak_qps"] is not None and figures["offline_samples_per_s"]:
    figures["peak_over_offline"] = (figures["peak_qps"]
                                    / figures["offline_samples_per_s"])
  if figures["low_load_p50_ms"] is not None and figures["single_p50_ms"]:
    figures["low_load_p50_minus_single_ms"] = (figures["low_load_p50_ms"]
                                               - figures["single_p50_ms"])
  return {k: v for k, v in figures.items() if v is not None}


def summarize(repetitions: list[dict]) -> dict:
  """{figure: {"median": m, "runs": [per repetition]}}; every ratio is taken
  within one repetition first, then its median across them."""
  per_run = [_figures(r) for r in repetitions]
  keys = list(dict.fromkeys(k for f in per_run for k in f))
  summary = {}
  for key in keys:
    values = [f.get(key) for f in per_run]  # None: that run has no such figure
    numbers = [v for v in values if isinstance(v, (int, float))]
    summary[key] = {"runs": values, "median": (
        statistics.median(numbers) if len(numbers) == len(values) else None)}
  return summary


def markdown(paths: dict[str, dict], target_latency_ms: float,
             low_load: float) -> str:
  """The paths side by side (in process, network): medians with each run's
  value in brackets, then what the network adds at batch 1."""
  rows = [
      ("Offline samples/s", "offline_samples_per_s", "{:,.0f}"),
      ("SingleStream p50 ms", "single_p50_ms", "{:.3f}"),
      ("SingleStream p99 ms", "single_p99_ms", "{:.3f}"),
      (f"Server peak VALID QPS (p99 <= {target_latency_ms:g} ms)", "peak_qps",
       "{:,.0f}"),
      ("peak / Offline", "peak_over_offline", "{:.0%}"),
      (f"Server p50 ms at {low_load:.0%} of peak", "low_load_p50_ms", "{:.3f}"),
      ("  minus SingleStream p50, ms", "low_load_p50_minus_single_ms",
       "{:+.3f}"),
      # From LoadGen's call into the SUT to the answer: the rest of LoadGen's
      # latency is LoadGen's own lateness in calling.
      ("SingleStream p50 inside the SUT, ms", "single_sut_p50_ms", "{:.3f}"),
      (f"Server p50 at {low_load:.0%} of peak inside the SUT, ms",
       "low_load_sut_p50_ms", "{:.3f}"),
  ]
  names = list(paths)
  lines = ["| LoadGen (median [runs]) | " + " | ".join(names) + " |",
           "|" + " --- |" * (len(names) + 1)]
  for label, key, fmt in rows:
    cells = []
    for name in names:
      entry = paths[name].get(key)
      show = lambda v: "none" if v is None else fmt.format(v)
      cells.append("" if entry is None or not any(
          isinstance(v, (int, float)) for v in entry["runs"]) else
                   f"{show(entry['median'])} "
                   f"[{', '.join(show(v) for v in entry['runs'])}]")
    if any(cells):
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if "in_process" in paths and "network" in paths:
    added = []
    for key, label in (("single_p50_ms", "p50"), ("single_p99_ms", "p99")):
      if all(paths[p].get(key, {}).get("median") is not None
             for p in ("in_process", "network")):
        added.append(f"{label} +{paths['network'][key]['median'] - paths['in_process'][key]['median']:.3f} ms")
    if added:
      lines += ["", "The network path adds at batch 1 (SingleStream medians): "
                + ", ".join(added) + "."]
  return "\n".join(lines) + "\n"
