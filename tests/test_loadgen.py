"""The deadline-aware batcher's contract (rtjax.infer.batcher, the LoadGen
SUT's and the server's), and real short LoadGen runs."""

import json
import threading
import time

import numpy as np
import pytest

from rtjax.bench import loadgen
from rtjax.infer import CompiledModel
from rtjax.infer import batcher as batcher_lib


def _batcher(model, service_s, **kwargs):
  """A DeadlineBatcher collecting answers and rejections by request tag."""
  answers, rejected, lock = {}, {}, threading.Lock()

  def respond(pairs):
    with lock:
      for request, rows in pairs:
        assert request.tag not in answers  # once each
        answers[request.tag] = (rows.copy(), time.perf_counter())

  def reject(request, error):
    with lock:
      rejected[request.tag] = error

  batcher = batcher_lib.DeadlineBatcher(model, service_s, respond, reject,
                                        **kwargs)
  return batcher, answers, rejected


def test_batcher_answers_every_query_once_with_its_rows():
  batches = []

  def model(rows):
    batches.append(len(rows))
    time.sleep(2e-3)  # slow enough that arrivals queue behind a batch
    return rows * 2

  batcher, answers, _ = _batcher(model, {1: 2e-3, 4: 2e-3, 8: 2e-3})
  requests = [batcher_lib.Request(np.full((1 + i % 3, 1), i, np.float32),
                                  tag=i) for i in range(300)]
  threads = [threading.Thread(target=lambda k=k: [
      batcher.submit(r) for r in requests[k::3]]) for k in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  batcher.stop()
  assert sorted(answers) == list(range(300))
  for i, (rows, _) in answers.items():
    np.testing.assert_array_equal(rows, np.full((1 + i % 3, 1), 2 * i))
  assert set(batches) <= {1, 4, 8} and max(batches) == 8  # batched, bucketed


def test_batcher_dispatches_at_once_when_idle():
  calls = []
  batcher, answers, _ = _batcher(lambda rows: calls.append(len(rows)) or rows,
                                 {1: 1e-3, 8: 1e-3})
  for i in range(5):
    start = time.perf_counter()
    batcher.submit(batcher_lib.Request(np.zeros((1, 1), np.float32), tag=i))
    while i not in answers:
      time.sleep(1e-4)
    # The old batcher waited max_wait_ms for company; this one does not.
    assert answers[i][1] - start < 0.05
    time.sleep(0.01)
  batcher.stop()
  assert calls == [1] * 5  # alone, on the smallest bucket


def test_batcher_picks_the_fastest_bucket_that_meets_every_deadline():
  seconds = {1: 0.01, 4: 0.02, 16: 0.05}  # rows per second: 100, 200, 320
  ran, gate = [], threading.Event()

  def model(rows):
    gate.wait()
    ran.append(len(rows))
    return rows

  batcher, answers, _ = _batcher(model, seconds, inline_s=0)
  far = time.perf_counter() + 10
  batcher.submit(batcher_lib.Request(np.zeros((1, 1)), far, tag="first"))
  time.sleep(0.05)  # the worker holds "first" at the gate
  for i in range(12):
    batcher.submit(batcher_lib.Request(np.zeros((1, 1)), far, tag=i))
  gate.set()
  batcher.stop()
  assert ran == [1, 16]  # 12 queued rows: bucket 16 serves the most per second
  # A deadline that bucket 16 would miss but bucket 4 meets: bucket 4 first.
  ran.clear()
  gate.clear()
  batcher, answers, _ = _batcher(model, seconds, inline_s=0)
  batcher.submit(batcher_lib.Request(np.zeros((1, 1)), far, tag="first"))
  time.sleep(0.05)
  # Due 40 ms after the gate opens: bucket 4 (20 ms) makes it, 16 (50) not.
  soon = time.perf_counter() + 0.05 + 0.04
  batcher.submit(batcher_lib.Request(np.zeros((1, 1)), soon, tag="urgent"))
  for i in range(11):
    batcher.submit(batcher_lib.Request(np.zeros((1, 1)), far, tag=i))
  time.sleep(0.05 - (time.perf_counter() - (soon - 0.09)))
  gate.set()
  batcher.stop()
  assert ran[:2] == [1, 4] and sum(ran) == 13


def test_batcher_rejects_at_once_what_its_deadline_cannot_take():
  batch_s = 0.05

  def model(rows):
    time.sleep(batch_s)
    return rows

  batcher, answers, rejected = _batcher(model, {1: batch_s, 2: batch_s},
                                        max_queue_rows=64)
  accepted, refused = [], []
  for i in range(40):
    now = time.perf_counter()
    request = batcher_lib.Request(np.zeros((1, 1)), now + 0.3, tag=i,
                                  arrival=now)
    try:
      batcher.submit(request)
      accepted.append(request)
    except batcher_lib.Rejected as e:
      assert e.reason == "deadline" and time.perf_counter() - now < 0.01
      refused.append(i)
  batcher.stop()
  # 0.3 s holds ~6 batches of 2 rows; the other requests are refused at once.
  assert 6 <= len(accepted) <= 14 and len(refused) == 40 - len(accepted)
  assert not rejected and sorted(answers) == [r.tag for r in accepted]
  late = max(answers[r.tag][1] - r.deadline for r in accepted)
  assert late <= batch_s, f"an admitted request missed by {late * 1e3:.0f} ms"
  with pytest.raises(batcher_lib.Rejected, match="shutting down"):
    batcher.submit(batcher_lib.Request(np.zeros((1, 1))))


def test_batcher_bounds_its_queue_and_survives_a_failing_batch():
  def model(rows):
    time.sleep(0.02)
    if rows[0, 0] < 0:
      raise RuntimeError("bad batch")
    return rows

  batcher, answers, rejected = _batcher(model, {1: 0.02}, max_queue_rows=3,
                                        inline_s=0)
  outcomes = []
  for i in range(6):
    try:
      batcher.submit(batcher_lib.Request(np.full((1, 1), -1.0 if i == 0 else i),
                                         tag=i))
      outcomes.append("queued")
    except batcher_lib.Rejected as e:
      outcomes.append(e.reason)
  batcher.stop()
  assert outcomes.count("queue_full") >= 2 and outcomes[0] == "queued"
  assert isinstance(rejected[0], RuntimeError)  # the failing batch's request
  assert all(answers[i][0][0, 0] == i for i in answers)  # the rest answered
  assert len(answers) == outcomes.count("queued") - 1


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
  token_keys = {k for k, mllog in loadgen.DETAIL_KEYS.items()
                if "token" in mllog}  # logged with token latencies only
  assert set(result) == set(loadgen.DETAIL_KEYS) - token_keys - {
      "scheduled_samples_per_second", "completed_samples_per_second"} | {
      "log_dir", "sut_p50_ms", "sut_p99_ms"}
  # Inside the SUT a query cannot take longer than LoadGen measured.
  assert 0 < result["sut_p50_ms"] <= result["p50_latency_ns"] / 1e6


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["SingleStream", "Server"])
def test_short_loadgen_runs_are_valid(trained, tmp_path, scenario):
  model = CompiledModel.from_checkpoint(trained[1], batch_sizes=(1, 8, 32))
  samples = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(np.float32)
  # Server: LoadGen's early-stopping check needs ~1000 queries for a p99.
  # The deadline leaves room for the other tests sharing the CPU (at 50 ms
  # one suite run's Server p99 missed it): validity is what is tested here,
  # speed is the benchmarks'.
  config = loadgen.LoadGenConfig(scenario=scenario, min_duration_ms=2000,
                                 min_query_count=1000, target_qps=500,
                                 target_latency_ms=500, max_batch=32)
  result = loadgen.run(model, samples, config, tmp_path)
  assert result["result"] == "VALID", (tmp_path / "mlperf_log_summary.txt").read_text()
  assert result["scenario"] == scenario
  assert (tmp_path / "mlperf_log_detail.txt").exists()
  key = "p90_latency_ns" if scenario == "SingleStream" else "p99_latency_ns"
  assert 0 < result[key] < 500e6
  if scenario == "Server":
    assert result["target_qps"] == 500 and result["target_latency_ns"] == 500e6
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


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["Offline", "Server"])
def test_every_query_gets_its_own_rows(tmp_path, scenario):
  # Queries LoadGen issues together go to the batcher as one request; each
  # answer must still be its own sample's output (LoadGen's accuracy log).
  samples = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  config = loadgen.LoadGenConfig(scenario=scenario, accuracy=True,
                                 target_qps=20_000, max_batch=8)
  loadgen.run(lambda rows: 2 * rows, samples, config, tmp_path)
  logged = json.loads((tmp_path / "mlperf_log_accuracy.json").read_text())
  assert sorted(e["qsl_idx"] for e in logged) == list(range(64))
  for entry in logged:
    answer = np.frombuffer(bytes.fromhex(entry["data"]), np.float32)
    np.testing.assert_array_equal(answer, 2 * samples[entry["qsl_idx"]])
