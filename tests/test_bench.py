"""Latency harness: percentiles from real timed calls, models timed in turns."""

import json

import pytest

from rtjax.bench.latency import interleaved_latency, percentiles
from rtjax.infer import CompiledModel
from tests.conftest import run_module


def test_percentiles_of_known_times():
  stats = percentiles([0.001 * i for i in range(1, 101)], batch=10)
  assert stats["p50_ms"] == pytest.approx(50.5)
  assert stats["p99_ms"] == pytest.approx(99.01)
  assert stats["max_ms"] == pytest.approx(100.0)
  assert stats["throughput_per_s"] == pytest.approx(10 / 0.0505)


def test_interleaved_latency_on_real_models(trained):
  served = [CompiledModel.from_checkpoint(trained[1], batch_sizes=(1, 32))
            for _ in range(2)]
  results = interleaved_latency(served, 32, iters=20, warmup=3)
  for r in results:
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["calls"] == 20


def test_bench_cli_writes_rows(trained, tmp_path):
  out = tmp_path / "bench.json"
  result = run_module("experiments.bench", f"--checkpoints={trained[1]}",
                      "--batch_sizes=1,8", "--iters=10", "--warmup=2",
                      f"--output={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [r["batch"] for r in rows] == [1, 8]
  assert all(r["speedup_p50"] == 1.0 and r["compile_seconds"] > 0 for r in rows)
