"""MLPerf LoadGen with token latencies over the generation scheduler, in
process: LoadGen issues queries (Offline: all at once; Server: Poisson
arrivals at a target QPS), each becomes a request on a Scheduler thread,
its first token is reported with FirstTokenComplete and its end with its
number of tokens, so LoadGen measures time to first token (TTFT), time per
output token (TPOT) and tokens/s. Continuous batching runs beside static
batching (a batch waits for its longest member) on the same engine.

The peak Server load is bisected against limits fixed before the run: p99
TTFT within `ttft_factor` x the idle TTFT of the longest prompt and p99
TPOT within `tpot_factor` x the idle TPOT. Runs are far shorter than
MLPerf's minimum query counts: not MLPerf-valid, and reported so.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import mlperf_loadgen as lg
import numpy as np
from etils import epath

from rtjax.bench.loadgen import parse_detail
from rtjax.infer.engine import Engine
from rtjax.infer.generation import Completion, Request
from rtjax.infer.scheduler import Scheduler
from rtjax.timing import realtime_threads

POLICIES = ("continuous", "static")


@dataclasses.dataclass
class Workload:
  """LoadGen's samples: a prompt and a token count each."""
  prompts: list[str]
  max_tokens: list[int]

  def request(self, index: int) -> Request:
    return Request(self.prompts[index], self.max_tokens[index])


def static_bound(low: int, high: int, slots: int) -> float:
  """E[longest of `slots`] / E[mean] for token counts uniform on
  [low, high]: the most continuous batching can gain over static."""
  counts = np.arange(low, high + 1)
  below = (counts - low + 1) / len(counts)  # P(X <= k)
  longest = np.sum(counts * (below ** slots - np.concatenate(
      [[0.0], below[:-1]]) ** slots))
  return float(longest / counts.mean())


def _sut(scheduler: Scheduler, workload: Workload, done: list):
  """LoadGen's issue callback: each query a request on the scheduler."""
  keep = []  # answers alive until LoadGen has copied them

  def answer(query, tokens, complete):
    array = np.asarray(tokens, np.int32)
    keep.append(array)
    response = lg.QuerySampleResponse(
        query.id, array.__array_interface__["data"][0], array.nbytes,
        len(array))
    (lg.QuerySamplesComplete if complete else lg.FirstTokenComplete)(
        [response])

  def issue(queries):
    for query in queries:
      first = []
      def on_text(text, query=query, first=first):
        if not first:
          first.append(True)
          answer(query, [0], complete=False)
      def on_end(completion: Completion, query=query):
        done.append(completion)
        answer(query, completion.tokens, complete=True)
      scheduler.submit(workload.request(query.index), on_text=on_text,
                       on_end=on_end)
  return issue


def run(engine: Engine, workload: Workload, scenario: str, policy: str,
        output_dir: epath.PathLike, target_qps: float = 1.0,
        expected_qps: float = 1.0, min_duration_ms: int = 5000,
        min_query_count: int = 100) -> dict:
  """One LoadGen performance run with token latencies: its detail log's
  results, and the completions (their own TTFT per prompt)."""
  output_dir = epath.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  settings = lg.TestSettings()
  settings.scenario = (lg.TestScenario.Server if scenario == "Server"
                       else lg.TestScenario.Offline)
  settings.mode = lg.TestMode.PerformanceOnly
  settings.use_token_latencies = True
  settings.server_target_qps = target_qps
  settings.server_coalesce_queries = True
  settings.offline_expected_qps = expected_qps
  settings.min_duration_ms = min_duration_ms
  settings.max_duration_ms = 20 * min_duration_ms
  settings.min_query_count = min_query_count
  log = lg.LogSettings()
  log.log_output.outdir = str(output_dir)
  log.log_output.copy_summary_to_stdout = False
  done: list[Completion] = []
  with realtime_threads():
    scheduler = Scheduler(engine, max_queue=1 << 30,
                          static=policy == "static")
    scheduler.start()
    sut = lg.ConstructSUT(_sut(scheduler, workload, done), lambda: None)
    qsl = lg.ConstructQSL(len(workload.prompts), len(workload.prompts),
                          lambda _: None, lambda _: None)
    try:
      lg.StartTestWithLogSettings(sut, qsl, settings, log)
    finally:
      scheduler.stop()
      lg.DestroyQSL(qsl)
      lg.DestroySUT(sut)
  results = parse_detail((output_dir / "mlperf_log_detail.txt").read_text())
  return {**results, "completions": done, "steps": scheduler.steps}


def idle(engine: Engine, prompts: dict[int, str], repeats: int = 10,
         tokens: int = 64, pause_s: float = 0.05) -> dict:
  """The idle engine, served as under load (a scheduler on its own
  thread) but one request at a time, `pause_s` apart: each prompt length's
  TTFT (ms) and the TPOT of a request of `tokens`, medians of `repeats`."""
  scheduler = Scheduler(engine)
  scheduler.start()

  def alone(text: str, count: int) -> Completion:
    ended = threading.Event()
    time.sleep(pause_s)
    stream = scheduler.submit(Request(text, count),
                              on_end=lambda completion: ended.set())
    ended.wait()
    return stream.completion

  try:
    alone(prompts[min(prompts)], 2)  # warm
    ttft = {n: float(np.median([alone(text, 1).ttft_s
                                for _ in range(repeats)]) * 1e3)
            for n, text in prompts.items()}
    tpot = float(np.median([alone(prompts[min(prompts)], tokens).tpot_s
                            for _ in range(repeats)]) * 1e3)
  finally:
    scheduler.stop()
  return {"ttft_ms": ttft, "tpot_ms": tpot}


def ttft_by_prompt(completions: list[Completion]) -> dict[int, float]:
  """p50 TTFT (ms) of the completions per prompt length."""
  lengths = sorted({len(c.request.prompt) for c in completions})
  return {n: float(np.median([c.ttft_s for c in completions
                              if len(c.request.prompt) == n]) * 1e3)
          for n in lengths}


def within(result: dict, limits: dict) -> bool:
  """p99 TTFT and p99 TPOT within the limits (ms)."""
  return ("ttft_p99_ns" in result
          and result["ttft_p99_ns"] / 1e6 <= limits["ttft_ms"]
          and result["tpot_p99_ns"] / 1e6 <= limits["tpot_ms"])


def peak(engine: Engine, workload: Workload, policy: str, limits: dict,
         high: float, output_dir: epath.Path, steps: int,
         min_duration_ms: int, min_query_count: int) -> dict:
  """The highest Server QPS within the limits, bisected in `steps` runs
  up to `high` (the Offline queries/s, which no Server run exceeds); with
  none within them, the lowest load tried as `below`."""
  low, best = 0.0, None
  for i in range(steps):
    qps = (low + high) / 2
    result = run(engine, workload, "Server", policy, output_dir / f"{i}",
                 target_qps=qps, min_duration_ms=min_duration_ms,
                 min_query_count=min_query_count)
    ok = within(result, limits)
    print(f"  {policy} Server at {qps:.2f} QPS: p99 TTFT "
          f"{result.get('ttft_p99_ns', float('nan')) / 1e6:.1f} ms, p99 "
          f"TPOT {result.get('tpot_p99_ns', float('nan')) / 1e6:.2f} ms: "
          f"{'within' if ok else 'over'} the limits", flush=True)
    if ok:
      best, low = {**result, "qps": qps}, qps
    else:
      high = qps
  return best or {"qps": 0.0, "below": high}


# Limits on a Server run fixed before it: p99 TTFT within this many times
# the idle TTFT of the longest prompt, p99 TPOT within this many times the
# idle TPOT.
TTFT_FACTOR, TPOT_FACTOR = 5.0, 3.0


def workload(windows: list[str], lengths: list[int], low: int, high: int,
             count: int, seed: int = 0) -> Workload:
  """`count` queries cycling through the prompt `lengths` (prefixes of
  different text windows), token counts uniform on [low, high]."""
  rng = np.random.default_rng(seed)
  prompts = [windows[i % len(windows)][:lengths[i % len(lengths)]]
             for i in range(count)]
  return Workload(prompts, [int(n) for n in rng.integers(low, high + 1,
                                                          count)])


def offline(engine: Engine, load: Workload, output_dir: epath.Path,
            repeats: int = 5) -> dict:
  """Every query at once under each policy, the policies in turns
  `repeats` times (this machine's speed drifts over seconds, so a turn's
  ratio alone can be off by 0.2): median tokens/s, each turn's ratio and
  their median, and the generate steps each policy took (the same every
  turn)."""
  runs = {policy: [] for policy in POLICIES}
  for turn in range(repeats):
    for policy in POLICIES:
      result = run(engine, load, "Offline", policy,
                   output_dir / f"{policy}_{turn}", expected_qps=1.0,
                   min_duration_ms=1, min_query_count=len(load.prompts))
      runs[policy].append(result)
      print(f"Offline {policy}: {result['tokens_per_second']:.0f} tokens/s "
            f"in {result['steps']} steps", flush=True)
  speed = {p: np.array([r["tokens_per_second"] for r in runs[p]])
           for p in POLICIES}
  ratios = speed["continuous"] / speed["static"]
  return {**{p: {"tokens_per_s": float(np.median(speed[p])),
                 "steps": runs[p][0]["steps"]} for p in POLICIES},
          "ratio": float(np.median(ratios)),
          "turn_ratios": [float(r) for r in ratios]}


def measure(engine: Engine, windows: list[str], output_dir: epath.PathLike,
            seconds: float = 10.0, steps: int = 5, low_load: float = 0.1,
            offline_queries: int = 200) -> dict:
  """Offline, continuous beside static (16-character prompts, outputs
  uniform on 16 to the context's rest); the idle engine; the Server peak
  of each policy within the limits (prompts of each bucket up to 128,
  outputs uniform on 16-128); a Server run at `low_load` x the continuous
  peak, its p50 TTFT per prompt length beside the idle engine's."""
  output_dir = epath.Path(output_dir)
  short = 16
  high_tokens = engine.context - short
  results = {"offline": offline(engine, workload(
      windows, [short], short, high_tokens, offline_queries),
      output_dir / "offline"), "slots": engine.slots,
      "bound": static_bound(short, high_tokens, engine.slots),
      "offline_tokens": (short, high_tokens)}
  lengths = [b for b in engine.buckets if b <= min(128, engine.context // 2)]
  longest = min(max(engine.buckets), engine.context - 1)
  results["idle"] = idle(engine, {n: windows[0][:n]
                                  for n in lengths + [longest]})
  results["limits"] = {
      "ttft_ms": TTFT_FACTOR * results["idle"]["ttft_ms"][longest],
      "tpot_ms": TPOT_FACTOR * results["idle"]["tpot_ms"]}
  served = workload(windows, lengths, 16, 128, 1000, seed=1)
  mean_tokens = np.mean(served.max_tokens)
  ceiling = results["offline"]["continuous"]["tokens_per_s"] / mean_tokens
  duration = int(seconds * 1e3)
  results["peak"] = {policy: peak(
      engine, served, policy, results["limits"], ceiling,
      output_dir / f"peak_{policy}", steps, duration, 50)
      for policy in POLICIES}
  qps = low_load * results["peak"]["continuous"]["qps"]
  if qps:
    light = run(engine, served, "Server", "continuous",
                output_dir / "low_load", target_qps=qps,
                min_duration_ms=duration, min_query_count=20)
    results["low_load"] = {"qps": qps,
                           "ttft_ms": ttft_by_prompt(light["completions"])}
  return results


def markdown(results: dict) -> str:
  """The tables: Offline, the Server peaks, the low-load TTFT check."""
  off, bound = results["offline"], results["bound"]
  ratio = off["ratio"]
  low, high = results["offline_tokens"]
  limits = results["limits"]
  lines = [
      "MLPerf LoadGen with token latencies, in process: runs far shorter "
      "than MLPerf's minimum query counts, so **not MLPerf-valid**. "
      f"{results['slots']} slots; static batching waits for a batch's "
      "longest member. The idle engine: one request at a time through the "
      "same scheduler thread, 50 ms apart.", "",
      f"Offline ({low}-character prompts, outputs uniform on {low}-{high} "
      f"tokens; medians of the policies in turns, "
      f"{len(off['turn_ratios'])} times):", "",
      "| policy | tokens/s | generate steps |", "| --- | --- | --- |"]
  for policy in POLICIES:
    lines.append(f"| {policy} | {off[policy]['tokens_per_s']:.0f} | "
                 f"{off[policy]['steps']} |")
  turns = ", ".join(f"{r:.2f}" for r in off["turn_ratios"])
  lines += ["", f"Continuous over static: **{ratio:.2f}x** tokens/s, the "
            f"median of the turns' {turns} "
            f"({off['static']['steps'] / off['continuous']['steps']:.2f}x "
            "fewer steps); the bound "
            f"E[longest of {results['slots']}] / E[mean] is {bound:.2f} "
            f"(0.8 x bound = {0.8 * bound:.2f}).", "",
            f"Server (prompts of each bucket up to 128 characters, outputs "
            f"uniform on 16-128 tokens). Limits fixed before the runs: p99 "
            f"TTFT <= {TTFT_FACTOR:g} x the idle TTFT of a "
            f"{max(results['idle']['ttft_ms'])}-character prompt = "
            f"{limits['ttft_ms']:.1f} ms; p99 TPOT <= {TPOT_FACTOR:g} x the "
            f"idle TPOT = {limits['tpot_ms']:.2f} ms.", "",
            "| policy | peak QPS within the limits | p99 TTFT ms | p99 TPOT "
            "ms | tokens/s |", "| --- | --- | --- | --- | --- |"]
  for policy in POLICIES:
    p = results["peak"][policy]
    if not p["qps"]:
      lines.append(f"| {policy} | none down to {p['below']:.2f} | - | - | - |")
      continue
    lines.append(
        f"| {policy} | {p['qps']:.2f} | {p['ttft_p99_ns'] / 1e6:.1f} | "
        f"{p['tpot_p99_ns'] / 1e6:.2f} | "
        f"{p['completed_tokens_per_second']:.0f} |")
  if "low_load" in results:
    light, idle_ms = results["low_load"], results["idle"]["ttft_ms"]
    lines += ["", f"At {light['qps']:.2f} QPS (10% of the continuous peak),"
              " p50 TTFT per prompt length against the idle engine's:", "",
              "| prompt | idle ms | at low load ms | within 10% + 1 ms |",
              "| --- | --- | --- | --- |"]
    for n, ms in light["ttft_ms"].items():
      ok = ms <= 1.1 * idle_ms[n] + 1.0
      lines.append(f"| {n} | {idle_ms[n]:.2f} | {ms:.2f} | "
                   f"{'yes' if ok else 'no'} |")
  return "\n".join(lines) + "\n"
