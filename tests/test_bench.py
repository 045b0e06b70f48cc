"""Latency harness: percentiles from real timed calls, models timed in turns."""

import ctypes
import gc
import gzip
import json
import sys
import threading
import types

import jax
import pytest

from rtjax import timing
from rtjax.bench import breakdown
from rtjax.bench.latency import interleaved_latency, percentiles
from rtjax.infer import CompiledModel
from tests.conftest import run_module


def test_percentiles_of_known_times():
  stats = percentiles([0.001 * i for i in range(1, 101)], batch=10)
  assert stats["p50_ms"] == pytest.approx(50.5)
  assert stats["p99_ms"] == pytest.approx(99.01)
  assert stats["max_ms"] == pytest.approx(100.0)
  assert stats["throughput_per_s"] == pytest.approx(10 / 0.0505)


def fake_calls(monkeypatch, names, seconds=None):
  """Calls that record their order; the n-th call overall lasts n seconds
  (or `seconds`) on a fake clock, so a time shows which call it measured."""
  clock, order = [0.0], []
  monkeypatch.setattr(timing, "time",
                      types.SimpleNamespace(perf_counter=lambda: clock[0]))

  def call(name):
    def run():
      order.append(name)
      clock[0] += seconds or len(order)
    return run
  return {name: call(name) for name in names}, order


def test_time_calls_in_turns_untimed_warmup_and_settle(monkeypatch):
  calls, order = fake_calls(monkeypatch, "ab")
  assert timing.time_calls(calls, iters=2, warmup=1) == {"a": [3, 5],
                                                         "b": [4, 6]}
  assert "".join(order) == "ab" + "ab" * 2
  calls, order = fake_calls(monkeypatch, "ab")
  times = timing.time_calls(calls, iters=3, warmup=1, block=2, settle=1)
  assert "".join(order) == "ab" + "aaabbb" * 2  # whole blocks: 4 timed each
  assert times == {"a": [4, 5, 10, 11], "b": [7, 8, 13, 14]}


def test_time_calls_settles_for_seconds_too(monkeypatch):
  # Each call lasts 1 s on the fake clock: 2.5 s of settling is 3 calls,
  # more than settle=1 asks; the timed ones come after.
  calls, order = fake_calls(monkeypatch, "ab", seconds=1.0)
  times = timing.time_calls(calls, iters=1, block=1, settle=1, settle_s=2.5)
  assert "".join(order) == "aaaabbbb"
  assert times == {"a": [1.0], "b": [1.0]}


def test_time_calls_budget(monkeypatch):
  calls, _ = fake_calls(monkeypatch, "a", seconds=1.0)
  assert len(timing.time_calls(calls, iters=2)["a"]) == 2
  assert len(timing.time_calls(calls, iters=2, budget_s=5)["a"]) == 5
  assert len(timing.time_calls(calls, iters=2, budget_s=5, max_iters=3)["a"]) == 3
  assert len(timing.time_calls(calls, iters=4, budget_s=0.0)["a"]) == 4


def test_time_calls_collects_no_garbage_while_timing():
  seen = []
  timing.time_calls({"a": lambda: seen.append(gc.isenabled())}, iters=3)
  assert seen == [False] * 3 and gc.isenabled()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_realtime_threads_reach_the_threads_started_inside():
  prctl = ctypes.CDLL(None).prctl
  slack = lambda: prctl(30, 0, 0, 0, 0)  # PR_GET_TIMERSLACK
  before, interval = slack(), sys.getswitchinterval()
  seen = []
  with timing.realtime_threads(switch_interval_s=1e-3):
    thread = threading.Thread(target=lambda: seen.append(
        (slack(), sys.getswitchinterval())))
    thread.start()
    thread.join()
  assert seen == [(1, 1e-3)] and before > 1
  assert (slack(), sys.getswitchinterval()) == (before, interval)


@pytest.mark.slow
def test_interleaved_latency_on_real_models(trained):
  served = [CompiledModel.from_checkpoint(trained[1], batch_sizes=(1, 32))
            for _ in range(2)]
  results = interleaved_latency(served, 32, iters=20, warmup=3)
  for r in results:
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["calls"] == 20


@pytest.mark.slow
def test_bench_cli_writes_rows(family_checkpoints, tmp_path):
  # The ViT: "auto" times its one conv (the patch embedding) per batch,
  # where the ResNet's convs would give it dozens of half-second trials;
  # the search itself is tests/test_lowering.py's.
  checkpoint = family_checkpoints["vit"]
  out = tmp_path / "bench.json"
  result = run_module("experiments.bench", f"--checkpoints={checkpoint}",
                      "--batch_sizes=1,8", "--iters=10", "--warmup=2",
                      "--conv_lowering=auto", "--embed_weights",
                      f"--output={out}", f"--profile={tmp_path / 'profile'}")
  assert result.returncode == 0, result.stderr[-2000:]
  # A trace of the timed calls, per-op events of XLA's CPU runtime inside.
  (trace,) = (tmp_path / "profile").glob("plugins/profile/*/*.trace.json.gz")
  assert b"PjitFunction" in gzip.decompress(trace.read_bytes())
  report = json.loads(out.read_text())
  (per_batch,) = report["lowering"].values()
  assert list(per_batch) == ["1", "8"]
  for result in per_batch.values():
    assert result["trials"][0][0] == "xla" and len(result["trials"]) > 1
    assert result["chosen"] in [name for name, _ in result["trials"]]
  rows = report["latency"]
  assert [r["batch"] for r in rows] == [1, 8]
  assert all(r["speedup_p50"] == 1.0 and r["compile_seconds"] > 0 for r in rows)
  assert all(r["breakdown"]["measured"]["t_predicted_s"] > 0 for r in rows)
  overhead = report["host_overhead"]
  assert 0 < overhead["trivial_jit_p50_us"] < overhead["request_p50_us"]
  bad = run_module("experiments.bench", f"--checkpoints={checkpoint}",
                   "--conv_lowering=conv1")
  assert bad.returncode != 0 and "--conv_lowering: bad conv lowering 'conv1'" in (
      bad.stderr + bad.stdout)


def test_collective_bytes_from_hlo_text():
  hlo = """
  %ar = f32[8,10]{1,0} all-reduce(f32[8,10]{1,0} %x), replica_groups={}
  %ag = bf16[4,16]{1,0} all-gather(bf16[2,16]{1,0} %y), dimensions={0}
  %t = (f32[2]{0}, s8[3]{0}) all-to-all(f32[2]{0} %a, s8[3]{0} %b)
  %add = f32[8,10]{1,0} add(f32[8,10]{1,0} %ar, f32[8,10]{1,0} %ar)
  """
  assert breakdown.collective_bytes(hlo) == 8 * 10 * 4 + 4 * 16 * 2 + 2 * 4 + 3


def test_breakdown_is_consistent_with_cost_analysis(trained):
  from rtjax.models.stats import cost_analysis
  served = CompiledModel.from_checkpoint(trained[1], batch_sizes=(8,))
  compiled = served.executables[8]
  peaks = {"flops_per_s": 1e11, "bytes_per_s": 1e10, "comm_bytes_per_s": 1e9}
  terms = breakdown.breakdown(compiled, peaks)
  costs = cost_analysis(compiled)
  assert terms["flops"] == costs["flops"] > 0
  assert terms["bytes_accessed"] == costs["bytes accessed"] > 0
  assert terms["t_compute_s"] == pytest.approx(costs["flops"] / 1e11)
  assert terms["t_memory_s"] == pytest.approx(costs["bytes accessed"] / 1e10)
  assert terms["collective_bytes"] == 0 and terms["t_comm_s"] == 0
  assert terms["t_predicted_s"] == pytest.approx(
      terms["t_compute_s"] + terms["t_memory_s"])
  # The peaks predict the time of the same kinds of calls timed here apart
  # (bests of 20: another test's burst on both cores can stall a few calls).
  measured = breakdown.measure_peaks(matmul_size=256, copy_mb=8, repeats=20)
  a = jax.numpy.ones((256, 256), jax.numpy.float32)
  matmul = jax.jit(lambda x: x @ x)
  times = timing.time_calls({"m": lambda: matmul(a).block_until_ready()}, 20,
                            warmup=1)["m"]
  predicted = 2 * 256 ** 3 / measured["flops_per_s"]
  assert 0.2 < predicted / min(times) < 5, (predicted, min(times))
  assert 1e7 < measured["bytes_per_s"] < 1e13
  for name, published in breakdown.PUBLISHED_PEAKS.items():
    assert published["flops_per_s"] > 1e14 and published["source"], name


@pytest.mark.slow
def test_serving_options_table(family_checkpoints, tmp_path):
  pytest.importorskip("onnxruntime", reason="peers need the rtjax[onnx] extra")
  result = run_module("experiments.bench_serving_options",
                      f"--checkpoint={family_checkpoints['lenet5']}",
                      "--iters=10", "--warmup=2", "--large_batch=8",
                      "--only=0,1", f"--output={tmp_path}", timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  text = (tmp_path / "options.md").read_text()
  assert text.startswith("Command: `") and "bench_serving_options" in text
  rows = [line for line in text.splitlines() if line.startswith("| ")][2:]
  assert [row.split(" | ")[0] for row in rows] == [
      "| async dispatch, XLA convs (jax defaults)", "| + synchronous dispatch"]
  for row in rows:
    assert row.split(" | ")[1] == "1: xla; 8: xla"  # XLA's convs
    ratios = [float(cell) for cell in row.strip(" |").split(" | ")[2:]]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
  assert sorted(p.name for p in tmp_path.glob("run*.json")) == [
      "run0.json", "run1.json"]  # each row its own experiments.bench run


@pytest.mark.slow
def test_lowering_bench_times_every_candidate(family_checkpoints, tmp_path):
  from rtjax.infer import lowering
  from rtjax.checkpoint import load_checkpoint
  path = family_checkpoints["lenet5"]
  out = tmp_path / "lowering.json"
  result = run_module("experiments.bench_lowering", f"--checkpoint={path}",
                      "--batch_sizes=2", "--iters=2", f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  model, metadata = load_checkpoint(path)
  candidates = lowering.candidate_blocks(
      model, metadata["model"]["args"]["input_shape"])
  assert sorted((r["layer"], r["lowering"]) for r in report["layers"]) == sorted(
      [(layer, "xla") for layer in candidates]
      + [(layer, lowering.describe({"": b})[1:])
         for layer, blocks in candidates.items() for b in blocks])
  assert {"patches", "4x4"} <= {r["lowering"] for r in report["layers"]}
  assert all(r["ms"] > 0 and r["gflops"] > 0 for r in report["layers"])
  assert [(r["model"], r["batch"]) for r in report["models"]] == [
      ("xla", 2), ("xla, embedded", 2), ("auto", 2), ("auto, embedded", 2)]
  assert report["models"][0]["lowering"] == "xla"
