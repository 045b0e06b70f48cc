"""MLPerf LoadGen: the dynamic batcher's contract, and real short LoadGen runs."""

import json
import threading
import time
import types

import numpy as np
import pytest

from rtjax.bench import loadgen
from rtjax.infer import CompiledModel


def test_batcher_answers_every_query_once_with_its_row():
  samples = np.arange(100, dtype=np.float32).reshape(100, 1)
  batches, answers, lock = [], [], threading.Lock()

  def model(rows):
    batches.append(len(rows))
    return rows * 2  # row i -> 2 * sample i

  def respond(pairs):
    with lock:
      answers.extend((q.id, float(out[0])) for q, out in pairs)

  batcher = loadgen.DynamicBatcher(model, samples, respond, max_batch=8,
                                   max_wait_ms=5)
  queries = [types.SimpleNamespace(id=1000 + i, index=(7 * i) % 100)
             for i in range(300)]
  threads = [threading.Thread(target=batcher.submit, args=(queries[k::3],))
             for k in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  batcher.stop()
  assert sorted(a[0] for a in answers) == [q.id for q in queries]  # once each
  expected = {q.id: 2.0 * q.index for q in queries}
  assert all(value == expected[qid] for qid, value in answers)
  assert max(batches) <= 8 and max(batches) > 1  # really batched


def mllog(key, value):
  """One line of mlperf_log_detail.txt as LoadGen writes it."""
  return ":::MLLOG " + json.dumps({
      "key": key, "value": value, "time_ms": 1.5,
      "namespace": "mlperf::logging", "event_type": "POINT_IN_TIME",
      "metadata": {"is_error": False, "is_warning": False}})


def test_detail_parser_reads_the_mllog_keys():
  text = "\n".join([
      mllog("effective_scenario", "Server"), mllog("effective_target_qps", 500),
      mllog("effective_target_latency_ns", 20000000),
      mllog("result_validity", "VALID"),
      mllog("result_completed_samples_per_sec", 298.451),
      mllog("result_99.00_percentile_latency_ns", 11104119),
      mllog("result_max_latency_ns", 31104119)])
  assert loadgen.parse_detail(text) == {
      "scenario": "Server", "result": "VALID", "target_qps": 500.0,
      "completed_samples_per_second": 298.451,
      "p99_latency_ns": 11104119.0, "target_latency_ns": 20000000.0}


@pytest.mark.slow
def test_offline_run_is_read_from_the_detail_log(tmp_path):
  def model(rows):
    time.sleep(1e-3)  # a steady call, so LoadGen expects a rate it can meet
    return rows
  samples = np.zeros((64, 4), np.float32)
  config = loadgen.LoadGenConfig(scenario="Offline", min_duration_ms=300,
                                 max_batch=32)
  result = loadgen.run(model, samples, config, tmp_path)
  assert result["result"] in ("VALID", "INVALID")
  assert result["scenario"] == "Offline"
  assert result["samples_per_second"] > 0 and result["target_qps"] > 0
  assert 0 < result["p50_latency_ns"] <= result["p90_latency_ns"] <= (
      result["p99_latency_ns"])
  assert set(result) == set(loadgen.DETAIL_KEYS) - {
      "scheduled_samples_per_second", "completed_samples_per_second"} | {
      "log_dir"}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["SingleStream", "Server"])
def test_short_loadgen_runs_are_valid(trained, tmp_path, scenario):
  model = CompiledModel.from_checkpoint(trained[1], batch_sizes=(1, 8, 32))
  samples = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
  # Server: LoadGen's early-stopping check needs ~1000 queries for a p99.
  config = loadgen.LoadGenConfig(scenario=scenario, min_duration_ms=2000,
                                 min_query_count=1000, target_qps=500,
                                 target_latency_ms=50, max_batch=32)
  result = loadgen.run(model, samples, config, tmp_path)
  assert result["result"] == "VALID", (tmp_path / "mlperf_log_summary.txt").read_text()
  assert result["scenario"] == scenario
  assert (tmp_path / "mlperf_log_detail.txt").exists()
  key = "p90_latency_ns" if scenario == "SingleStream" else "p99_latency_ns"
  assert 0 < result[key] < 50e6
  if scenario == "Server":
    assert result["target_qps"] == 500 and result["target_latency_ns"] == 50e6
    assert result["completed_samples_per_second"] > 0


@pytest.mark.slow
def test_peak_server_qps_bisects_between_its_bounds(trained, tmp_path):
  model = CompiledModel.from_checkpoint(trained[1], batch_sizes=(1, 8, 32))
  samples = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
  config = loadgen.LoadGenConfig(min_duration_ms=1000, min_query_count=1000,
                                 target_latency_ms=50, max_batch=32)
  bound = loadgen.expectations(model, samples, 32)[1]
  # The first probe, a tenth of the measured throughput with a 50 ms
  # deadline, is VALID on any machine; the second one bisects above it.
  high = 0.2 * bound
  result = loadgen.find_peak_server_qps(model, samples, config, tmp_path,
                                        high=high, steps=2)
  assert [p.name for p in sorted(tmp_path.iterdir())] == ["qps_0", "qps_1"]
  assert result["last_valid"]["result"] == "VALID"
  low, top = result["searched"]
  assert result["peak_valid_qps"] == low >= high / 2
  assert top in (high, 0.75 * high)
