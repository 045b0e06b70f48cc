"""The steps of experiments.bench: checkpoints served side by side, timed in
turns, their measured p50 set against the roofline's prediction, the host's
share of a batch-1 call, peers on the same weights and streaming. Each step
prints its lines as it goes and returns its rows for the results files.
"""

from __future__ import annotations

from typing import Sequence

from rtjax.bench import breakdown, loadgen, peers, report
from rtjax.bench.latency import (host_overhead, interleaved_latency, profiled,
                                 streaming_latency)
from rtjax.checkpoint import load_checkpoint
from rtjax.errors import FlagError
from rtjax.infer import CompiledModel, lowering
from rtjax.infer.streaming import StreamingModel


def check_names(scenarios: Sequence[str], chips: Sequence[str]) -> None:
  """LoadGen scenarios and chips of published peaks that exist, else a
  FlagError naming the known ones."""
  unknown = sorted(set(scenarios) - set(loadgen.SCENARIOS))
  if unknown:
    raise FlagError(f"--loadgen: unknown scenario(s) {', '.join(unknown)}; "
                    f"known: {', '.join(loadgen.SCENARIOS)}")
  unknown = sorted(set(chips) - set(breakdown.PUBLISHED_PEAKS))
  if unknown:
    raise FlagError(f"--published_peaks: unknown chip(s) "
                    f"{', '.join(unknown)}; known: "
                    f"{', '.join(breakdown.PUBLISHED_PEAKS)}")


def lowering_report(model: CompiledModel) -> dict:
  """Per batch size: the conv lowering served and each one timed (seconds)."""
  return {batch: {"chosen": lowering.describe(chosen),
                  "trials": [[lowering.describe(t["lowering"]), t["seconds"]]
                             for t in model.lowering_trials.get(batch, [])]}
          for batch, chosen in model.conv_lowering.items()}


def latency_rows(paths: Sequence[str], served: Sequence[CompiledModel],
                 batches: Sequence[int], iters: int, warmup: int,
                 profile_dir: str = "") -> list[dict]:
  """Per batch, every checkpoint timed in turns (a jax.profiler trace of the
  timed calls under `profile_dir` when given); speedups against the first."""
  for path, model in zip(paths, served):
    print(f"conv lowering of {path} per batch size: " + ", ".join(
        f"{b}: {lowering.describe(l)}" for b, l in model.conv_lowering.items()))
  print(f"{'checkpoint':<40} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'items/s':>10} {'speedup':>8} {'compile s':>9}")
  with profiled(profile_dir):
    latencies = {batch: interleaved_latency(served, batch, iters, warmup)
                 for batch in batches}
  if profile_dir:
    print(f"profile of the timed calls written under {profile_dir}")
  rows = []
  for batch, results in latencies.items():
    for path, model, result in zip(paths, served, results):
      row = {"checkpoint": path, "batch": batch,
             "stage": model.metadata.get("stage"),
             "flops_per_example": model.metadata.get("flops_per_example"),
             "compile_seconds": model.compile_seconds[batch],
             "speedup_p50": results[0]["p50_ms"] / result["p50_ms"], **result}
      rows.append(row)
      print(f"{path[-40:]:<40} {batch:>5} {row['p50_ms']:>8.3f} "
            f"{row['p90_ms']:>8.3f} {row['p99_ms']:>8.3f} "
            f"{row['throughput_per_s']:>10.0f} {row['speedup_p50']:>7.2f}x "
            f"{row['compile_seconds']:>9.3f}", flush=True)
  return rows


def add_breakdowns(rows: list[dict], served: dict[str, CompiledModel],
                   chips: Sequence[str] = ()) -> dict:
  """Each row's predicted t_compute + t_memory + t_comm (from its
  executable's cost analysis) with this machine's measured peaks and the
  published peaks of `chips`, set beside its measured p50; the peaks used."""
  peaks = {"measured": breakdown.measure_peaks()}
  peaks.update({name: breakdown.PUBLISHED_PEAKS[name] for name in chips})
  print(f"\npredicted t_compute + t_memory + t_comm vs measured p50 "
        f"(peaks: {peaks['measured']['source']}: "
        f"{peaks['measured']['flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"{peaks['measured']['bytes_per_s'] / 1e9:.1f} GB/s)")
  for row in rows:
    executable = served[row["checkpoint"]].executables[row["batch"]]
    terms = {name: breakdown.breakdown(executable, p)
             for name, p in peaks.items()}
    row["breakdown"] = terms
    m = terms["measured"]
    print(f"{row['checkpoint'][-40:]:<40} {row['batch']:>5} compute "
          f"{m['t_compute_s'] * 1e3:.4f} ms + memory {m['t_memory_s'] * 1e3:.4f} "
          f"ms + comm {m['t_comm_s'] * 1e3:.4f} ms = {m['t_predicted_s'] * 1e3:.4f} "
          f"ms predicted, {row['p50_ms']:.4f} ms measured"
          + "".join(f"; {n} (published) {t['t_predicted_s'] * 1e3:.5f} ms"
                    for n, t in terms.items() if n != "measured"), flush=True)
  return peaks


def call_paths(model: CompiledModel) -> dict:
  """rtjax.bench.latency.host_overhead of `model`, printed."""
  overhead = host_overhead(model)
  print("batch-1 call paths of the first checkpoint (p50, microseconds): "
        + ", ".join(f"{k.removesuffix('_p50_us')} {v:.1f}"
                    for k, v in overhead.items() if k.endswith("_p50_us"))
        + f"; request overhead over the device call "
        f"{overhead['request_overhead_us']:.1f}", flush=True)
  return overhead


def peer_rows(paths: Sequence[str], served: Sequence[CompiledModel],
              batches: Sequence[int], iters: int, warmup: int,
              rtjax_graph: bool = False, torch_compile: bool = True) -> dict:
  """{path: {"model", "serving", batch: rtjax.bench.peers.compare_peers}}:
  each checkpoint's weights in ONNX Runtime and PyTorch, in turns with
  rtjax."""
  results = {}
  for path, compiled in zip(paths, served):
    model, metadata = load_checkpoint(path)
    name = metadata["model"]["name"]
    results[path] = {"model": name,
                     "serving": report.serving_summary(compiled)}
    for batch in batches:
      results[path][batch] = result = peers.compare_peers(
          compiled, model, metadata["model"], batch, iters, warmup,
          rtjax_graph=rtjax_graph, torch_compile=torch_compile)
      for contender, r in result["contenders"].items():
        print(f"peers {name} batch {batch:>4} {contender:<26}"
              f" p50 {r['p50_ms']:.4f} ms, p99 {r['p99_ms']:.4f} ms, "
              f"{r['throughput_per_s']:.0f}/s; rtjax p50 / its p50 = "
              f"{r['rtjax_p50_ratio']:.2f}, rtjax throughput / its = "
              f"{r['rtjax_throughput_ratio']:.2f}", flush=True)
      for note in result["notes"]:
        print(f"peers {name} batch {batch:>4}: {note}")
  return results


def streaming_rows(path: str, chunks: Sequence[int], iters: int,
                   warmup: int) -> dict:
  """{chunk: per-step latency} of the checkpoint streamed `chunk` steps per
  call (rtjax.infer.streaming)."""
  results = {}
  for chunk in chunks:
    stream = StreamingModel.from_checkpoint(path, chunk=chunk)
    results[chunk] = r = streaming_latency(stream, iters, warmup)
    print(f"streaming in chunks of {chunk} step(s): per step p50 "
          f"{r['step_p50_ms']:.4f} ms, p99 {r['step_p99_ms']:.4f} ms, device "
          f"{r['device_step_p50_ms']:.4f} ms, host overhead "
          f"{r['host_overhead_per_step_us']:.1f} us", flush=True)
  return results
