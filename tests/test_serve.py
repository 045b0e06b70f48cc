"""The model server (rtjax.serve, experiments.serve) driven by tritonclient,
Triton's own off-the-shelf client: readiness, equality with CompiledModel,
concurrency with malformed requests among good ones, overload against a
model that sleeps a fixed time per batch, metrics, SIGTERM, and LoadGen
queries sent over the network."""

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
import tritonclient.http.aio as tritonclient_aio  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from rtjax.bench import loadgen  # noqa: E402
from rtjax.infer import CompiledModel  # noqa: E402
from rtjax.serve import ModelServer, Servable, from_checkpoint  # noqa: E402
from rtjax.serve.protocol import Signature  # noqa: E402
from rtjax.serve.server import uvicorn_server  # noqa: E402
from tests.conftest import REPO, free_port  # noqa: E402

BUCKETS = (1, 2, 4, 8)


class Running:
  """A ModelServer under uvicorn on a thread of this process."""

  def __init__(self, server: ModelServer):
    self.server, self.port = server, free_port()
    self.url = f"127.0.0.1:{self.port}"
    self.runner = uvicorn_server(server, "127.0.0.1", self.port)
    self.thread = threading.Thread(target=self.runner.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 30
    while not self.runner.started:
      assert time.time() < deadline and self.thread.is_alive(), "no start"
      time.sleep(0.02)

  def status(self, path: str) -> int:
    try:
      with urllib.request.urlopen(f"http://{self.url}{path}") as r:
        return r.status
    except urllib.error.HTTPError as e:
      return e.code

  def post(self, path: str, body: bytes, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{self.url}{path}", data=body,
                                     headers=headers or {}, method="POST")
    try:
      with urllib.request.urlopen(request) as r:
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def stop(self):
    self.runner.should_exit = True
    self.thread.join(30)


@pytest.fixture(scope="module")
def served(trained):
  """The tiny checkpoint behind a server started unloaded: the readiness
  seen before load() is kept for the readiness test."""
  server = ModelServer(
      {"tiny": lambda: from_checkpoint(trained[1], "tiny", BUCKETS)},
      deadline_ms=5000, max_body_bytes=1 << 20, load_on_startup=False)
  running = Running(server)
  running.before_load = {
      path: running.status(path) for path in (
          "/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready")}
  server.load()
  yield running
  running.stop()


@pytest.fixture(scope="module")
def reference(trained):
  return CompiledModel.from_checkpoint(trained[1], batch_sizes=BUCKETS)


def _input(images, binary=True, name="images", datatype="FP32"):
  tensor = tritonclient_http.InferInput(name, list(images.shape), datatype)
  tensor.set_data_from_numpy(images, binary_data=binary)
  return tensor


def test_ready_only_once_compiled(served):
  assert served.before_load == {"/v2/health/live": 200,
                                "/v2/health/ready": 503,
                                "/v2/models/tiny/ready": 503}
  client = tritonclient_http.InferenceServerClient(served.url)
  assert client.is_server_live() and client.is_server_ready()
  assert client.is_model_ready("tiny")


def test_metadata_names_the_tensors(served):
  client = tritonclient_http.InferenceServerClient(served.url)
  metadata = client.get_model_metadata("tiny")
  assert metadata["inputs"] == [{"name": "images", "datatype": "FP32",
                                 "shape": [-1, 8, 8, 1]}]
  assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32",
                                  "shape": [-1, 10]}]
  assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
  with pytest.raises(InferenceServerException, match="unknown model"):
    client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_compiled_model(served, reference, binary):
  client = tritonclient_http.InferenceServerClient(served.url)
  rng = np.random.default_rng(0)
  for rows in (1, 3, 8):
    images = rng.normal(size=(rows, 8, 8, 1)).astype(np.float32)
    result = client.infer("tiny", [_input(images, binary)], request_id="r7",
                          outputs=[tritonclient_http.InferRequestedOutput(
                              "logits", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("logits"), reference(images),
                               atol=1e-6, rtol=0)
    assert result.get_response()["id"] == "r7"


def test_concurrent_requests_with_malformed_ones_among_them(served, reference):
  images = np.random.default_rng(1).normal(size=(100, 8, 8, 1)).astype(
      np.float32)
  wrong_shape = _input(np.zeros((1, 8, 8, 2), np.float32))
  header = json.dumps({"inputs": [{  # declares 256 bytes, 100 follow
      "name": "images", "shape": [1, 8, 8, 1], "datatype": "FP32",
      "parameters": {"binary_data_size": 256}}]}).encode()
  raw = {  # sent beside the tritonclient requests, each must get its status
      "bad JSON": (b'{"inputs": [', {}, 400),
      "wrong datatype": (json.dumps({"inputs": [{
          "name": "images", "shape": [1, 8, 8, 1], "datatype": "INT32",
          "data": [0] * 64}]}).encode(), {}, 400),
      "wrong element count": (json.dumps({"inputs": [{
          "name": "images", "shape": [1, 8, 8, 1], "datatype": "FP32",
          "data": [0.5] * 63}]}).encode(), {}, 400),
      "binary size mismatch": (header + b"\0" * 100, {
          "Inference-Header-Content-Length": str(len(header))}, 400),
      "oversized body": (b" " * (2 << 20), {}, 413),
      "JSON nested 50,000 deep": (b"[" * 50000 + b"]" * 50000, {}, 400),
  }
  raw_results = {}

  def send_raw():
    for name, (body, headers, _) in raw.items():
      raw_results[name] = served.post("/v2/models/tiny/infer", body, headers)

  async def send_all():
    client = tritonclient_aio.InferenceServerClient(served.url)
    try:
      sends = [client.infer("tiny", [_input(images[i:i + 1])])
               for i in range(100)]
      sends.insert(50, client.infer("tiny", [wrong_shape]))
      return await asyncio.gather(*sends, return_exceptions=True)
    finally:
      await client.close()

  side = threading.Thread(target=send_raw)
  side.start()
  results = asyncio.run(send_all())
  side.join()
  bad = results.pop(50)
  assert isinstance(bad, InferenceServerException) and bad.status() == "400"
  assert "the model takes [N, 8, 8, 1]" in bad.message()
  errors = [r for r in results if isinstance(r, Exception)]
  assert not errors, errors[:3]
  outputs = np.concatenate([r.as_numpy("logits") for r in results])
  # Batched with whichever requests came along, so run in other buckets
  # than the reference's: XLA's CPU code differs per batch size, and the
  # float32 sums with it (~2e-6 measured). Same-bucket equality within 1e-6
  # is test_infer_equals_compiled_model's.
  np.testing.assert_allclose(outputs, reference(images), atol=1e-5, rtol=1e-5)
  for name, (_, _, status) in raw.items():
    assert raw_results[name][0] == status, (name, raw_results[name])
    assert raw_results[name][1]["error"], name
  # Still serving after all of that.
  client = tritonclient_http.InferenceServerClient(served.url)
  assert client.infer("tiny", [_input(images[:1])]).as_numpy("logits").shape == (1, 10)


def test_metrics_count_requests_batches_and_rejections(served):
  client = tritonclient_http.InferenceServerClient(served.url)
  client.infer("tiny", [_input(np.zeros((2, 8, 8, 1), np.float32))])
  with pytest.raises(InferenceServerException):
    client.infer("tiny", [_input(np.zeros((2, 8, 8, 1), np.float32))],
                 timeout=1)  # 1 us: no bucket is that fast
  with urllib.request.urlopen(f"http://{served.url}/metrics") as r:
    text = r.read().decode()
  values = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      key, value = line.rsplit(" ", 1)
      values[key] = float(value)
  assert values['rtjax_requests_total{code="200",model="tiny"}'] >= 1
  assert values['rtjax_requests_total{code="429",model="tiny"}'] >= 1
  assert values['rtjax_rejected_requests_total{model="tiny",reason="deadline"}'] >= 1
  assert values['rtjax_batch_rows_count{model="tiny"}'] >= 1
  assert values['rtjax_request_latency_seconds_count{model="tiny"}'] >= 1
  assert values['rtjax_queue_rows{model="tiny"}'] == 0


def test_a_client_that_leaves_mid_body_is_counted_not_logged(served):
  # uvicorn logs an application's failure on its own logger, which does not
  # propagate to the root one.
  records = []
  handler = logging.Handler(logging.ERROR)
  handler.emit = records.append
  logging.getLogger("uvicorn.error").addHandler(handler)
  try:
    for _ in range(20):  # each promises 1,000 bytes, sends 10, hangs up
      with socket.create_connection(("127.0.0.1", served.port)) as raw:
        raw.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b"{" * 10)
    counted, deadline = 0.0, time.time() + 10
    while counted < 20 and time.time() < deadline:
      time.sleep(0.1)
      with urllib.request.urlopen(f"http://{served.url}/metrics") as r:
        counted = sum(float(line.split()[-1]) for line in
                      r.read().decode().splitlines() if line.startswith(
                          'rtjax_rejected_requests_total{model="tiny",'
                          'reason="client_disconnected"}'))
  finally:
    logging.getLogger("uvicorn.error").removeHandler(handler)
  assert not records, records[0].getMessage()
  assert counted == 20
  assert served.status("/v2/health/ready") == 200


def _sleeping_servable(batch_s: float) -> Servable:
  """A model whose every batch takes batch_s: capacity known in advance."""
  def run(rows):
    time.sleep(batch_s)
    return np.zeros((len(rows), 2), np.float32)
  return Servable("sleepy", run, (1, 2, 4),
                  Signature("images", (3,), "FP32", "logits", (2,), "FP32"))


@pytest.mark.xfail(strict=False, reason=(
    "open defect: in some processes every refusal of the burst arrives "
    "together ~5.5 batch times late (0.55 s), deterministically when "
    "scikit-learn/scipy were not imported before the server started, in "
    "about half of the suite runs otherwise; cause not yet found"))
def test_overload_is_refused_at_once_and_admitted_requests_meet_deadlines():
  batch_s, deadline_s, offered = 0.1, 0.6, 120
  running = Running(ModelServer(
      {"sleepy": lambda: _sleeping_servable(batch_s)}, timing_calls=3))
  try:
    deadline = time.time() + 30
    while running.status("/v2/health/ready") != 200:
      assert time.time() < deadline
      time.sleep(0.05)

    async def one(client, row):
      start = time.perf_counter()
      try:
        await client.infer("sleepy", [_input(row)],
                           timeout=int(deadline_s * 1e6))
        outcome = "ok"
      except InferenceServerException as e:
        outcome = e.status()
      return outcome, time.perf_counter() - start

    async def offer():
      client = tritonclient_aio.InferenceServerClient(running.url)
      try:
        row = np.zeros((1, 3), np.float32)
        return await asyncio.gather(*[one(client, row) for _ in range(offered)])
      finally:
        await client.close()

    results = asyncio.run(offer())
  finally:
    running.stop()
  ok = [t for outcome, t in results if outcome == "ok"]
  refused = [t for outcome, t in results if outcome == "429"]
  assert len(ok) + len(refused) == offered, results
  # The deadline holds ~deadline_s / batch_s batches of 4 rows; five times
  # that many requests were offered at once.
  capacity = round(deadline_s / batch_s) * 4
  assert 4 <= len(ok) <= capacity and len(refused) >= offered - capacity
  assert max(refused) < batch_s, f"a refusal took {max(refused):.3f} s"
  assert max(ok) <= deadline_s + batch_s, f"admitted, then {max(ok):.3f} s"


@pytest.mark.slow
def test_loadgen_queries_over_the_network(served, trained, tmp_path):
  model = CompiledModel.from_checkpoint(trained[1], batch_sizes=BUCKETS)
  samples = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(
      np.float32)
  # A generous deadline: this checks that every query goes through the
  # server and back (the figures come from experiments.bench, not a test
  # whose client shares the server's interpreter).
  # (LoadGen's early stopping wants ~460 queries even if all are in time.)
  config = loadgen.LoadGenConfig(min_duration_ms=1000, min_query_count=600,
                                 target_qps=300, target_latency_ms=1000,
                                 max_batch=8, server_url=served.url,
                                 model_name="tiny")
  for scenario in ("SingleStream", "Server"):
    result = loadgen.run(model, samples, loadgen.LoadGenConfig(
        **{**config.__dict__, "scenario": scenario}), tmp_path / scenario)
    assert result["refused_queries"] == 0
    assert result["result"] == "VALID", (
        tmp_path / scenario / "mlperf_log_summary.txt").read_text()
    assert 0 < result["p50_latency_ns"] < 1e9


def _start(*flags: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "experiments.serve", *flags],
                          cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_exits_0(trained):
  port = free_port()
  process = _start(f"--checkpoint={trained[1]}", f"--port={port}",
                   "--batch_sizes=256", "--deadline_ms=60000", "--model_names=tiny",
                   "--max_queue_rows=16384")
  url = f"127.0.0.1:{port}"
  try:
    client = tritonclient_http.InferenceServerClient(url)
    deadline = time.time() + 120
    while True:
      assert process.poll() is None, process.communicate()
      assert time.time() < deadline, "never ready"
      try:
        if client.is_server_ready():
          break
      except Exception:  # not listening yet
        pass
      time.sleep(0.1)
    images = np.zeros((256, 8, 8, 1), np.float32)
    first = threading.Event()

    async def one(client):
      result = await client.infer("tiny", [_input(images)])
      first.set()
      return result.as_numpy("logits").shape

    async def offer():
      client = tritonclient_aio.InferenceServerClient(url)
      try:
        return await asyncio.gather(*[one(client) for _ in range(40)],
                                    return_exceptions=True)
      finally:
        await client.close()

    results = []
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(offer())))
    sender.start()
    assert first.wait(60), ([str(r) for r in results[:2]], process.poll())
    process.send_signal(signal.SIGTERM)  # while the rest are in flight
    sender.join(120)
    code = process.wait(60)
  finally:
    if process.poll() is None:
      process.kill()
  assert results == [(256, 10)] * 40, [str(r) for r in results]
  assert code == 0, process.stderr.read()[-2000:]


@pytest.mark.slow
def test_bad_flags_and_checkpoints_are_one_line_errors(tmp_path):
  for flags, culprit in ((["--checkpoint=" + str(tmp_path / "none")], "none"),
                         (["--checkpoint=x", "--port=0"], "--port")):
    process = _start(*flags)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0], err[-2000:]
