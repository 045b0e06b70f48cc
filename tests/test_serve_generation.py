"""Text generation over HTTP (rtjax.serve.generating), spoken to by
off-the-shelf clients: the openai client's completions, streamed and not,
50 streams at once, each equal to the engine's own text; plain HTTP for
Triton's generate extension; a client that leaves mid-stream; overload
against an engine slowed to a fixed step time; malformed bodies; SIGTERM
mid-stream."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

# A server and real HTTP clients: end-to-end, so `make test-fast` skips it.
pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
pytest.importorskip("tritonclient.http")

from rtjax import models  # noqa: E402
from rtjax.checkpoint import save_complete_step  # noqa: E402
from rtjax.infer import generation, scheduler  # noqa: E402
from rtjax.infer.engine import Engine  # noqa: E402
from rtjax.infer.sampling import Sampling  # noqa: E402
from rtjax.serve import ModelServer, from_checkpoint  # noqa: E402
from rtjax.serve.generating import Generator  # noqa: E402
from tests.conftest import REPO, free_port  # noqa: E402
from tests.test_generation import ARGS, CONTEXT, VOCABULARY  # noqa: E402
from tests.test_serve import Running  # noqa: E402

SLOTS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm")
  save_complete_step(models.create_model("decoder", ARGS, seed=3),
                     {"model": {"name": "decoder", "args": ARGS},
                      "dataset": {"vocabulary": VOCABULARY}}, workdir)
  return workdir


@pytest.fixture(scope="module")
def engine(checkpoint):
  """The engine the server's text is compared with."""
  return Engine.from_checkpoint(checkpoint, slots=SLOTS, buckets=(16, 32))


@pytest.fixture(scope="module")
def served(checkpoint):
  server = ModelServer({"lm": lambda: from_checkpoint(checkpoint, "lm", [1],
                                                      slots=SLOTS)},
                       timing_calls=2)
  running = Running(server)
  deadline = time.time() + 60
  while running.status("/v2/health/ready") != 200:
    assert time.time() < deadline and server.load_error is None
    time.sleep(0.05)
  yield running
  running.stop()


STEP_S = 0.04  # the slowed engine's time per generate step


@pytest.fixture(scope="module")
def slow(checkpoint):
  """A server whose engine has two slots and steps of exactly STEP_S."""
  engine = Engine.from_checkpoint(checkpoint, slots=2, buckets=(16,))
  generate = engine.generate

  def slowed():
    start = time.perf_counter()
    gained = generate()
    time.sleep(max(0.0, STEP_S - (time.perf_counter() - start)))
    return gained

  engine.generate = slowed
  running = Running(ModelServer({"slow": lambda: Generator("slow", engine)},
                                timing_calls=2))
  while running.status("/v2/health/ready") != 200:
    time.sleep(0.05)
  yield running
  running.stop()


def sse_events(response) -> list:
  """The JSON of each `data:` line of a Server-Sent Events response."""
  events = []
  for line in response.read().decode().splitlines():
    if line.startswith("data: ") and line != "data: [DONE]":
      events.append(json.loads(line[len("data: "):]))
  return events


def post(url: str, path: str, body, headers=None):
  connection = http.client.HTTPConnection(url, timeout=30)
  connection.request("POST", path, body if isinstance(body, bytes)
                     else json.dumps(body), headers or {})
  return connection, connection.getresponse()


def test_openai_completions_and_the_generate_extension(served, engine):
  client = openai.OpenAI(base_url=f"http://{served.url}/v1", api_key="-")
  assert [m.id for m in client.models.list().data] == ["lm"]
  sampling = Sampling(0.8, 0, 0.9, seed=11)
  want = scheduler.run(engine, [generation.Request(
      "the king", 24, sampling, ("zz",))])[0]
  done = client.completions.create(model="lm", prompt="the king",
                                   max_tokens=24, temperature=0.8,
                                   top_p=0.9, seed=11, stop=["zz"])
  assert done.choices[0].text == want.text
  assert done.choices[0].finish_reason == want.finish_reason
  assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
      8, len(want.tokens))
  stream = client.completions.create(
      model="lm", prompt="the king", max_tokens=24, temperature=0.8,
      top_p=0.9, seed=11, stop=["zz"], stream=True,
      stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
      want.finish_reason)
  assert chunks[-1].usage.completion_tokens == len(want.tokens)
  # Triton's generate extension: greedy unless told, one event per token.
  greedy = scheduler.run(engine, [generation.Request("o", 10)])[0]
  _, response = post(served.url, "/v2/models/lm/generate",
                     {"text_input": "o", "parameters": {"max_tokens": 10}})
  assert json.loads(response.read())["text_output"] == greedy.text
  _, response = post(served.url, "/v2/models/lm/generate_stream",
                     {"text_input": "o", "max_tokens": 10})
  assert response.getheader("content-type").startswith("text/event-stream")
  events = sse_events(response)
  assert "".join(e["text_output"] for e in events) == greedy.text
  assert len(events) == len(greedy.text)


def test_fifty_concurrent_streams_each_get_the_engines_text(served, engine):
  requests = [generation.Request(f"the {'king queen'[i % 2::2]}", 12 + i % 9,
                                 Sampling(1.0, 0, 1.0, seed=i))
              for i in range(50)]
  want = [c.text for c in scheduler.run(engine, requests)]
  client = openai.OpenAI(base_url=f"http://{served.url}/v1", api_key="-")

  def stream(request):
    chunks = client.completions.create(
        model="lm", prompt=request.prompt, max_tokens=request.max_tokens,
        temperature=1.0, seed=request.sampling.seed, stream=True)
    return "".join(c.choices[0].text for c in chunks)

  with ThreadPoolExecutor(50) as pool:
    got = list(pool.map(stream, requests))
  assert got == want


def test_a_client_that_leaves_frees_its_slot_within_a_step(slow):
  scheduled = slow.server.schedulers["slow"]
  cancelled, cancel = [], scheduled.cancel
  scheduled.cancel = lambda s: (cancelled.append(s), cancel(s))
  try:
    connection, response = post(slow.url, "/v2/models/slow/generate_stream",
                                {"text_input": "o", "max_tokens": 120})
    assert response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)  # mid-stream
    deadline = time.time() + 10
    while not cancelled or cancelled[0].ended_at_step < 0:
      assert time.time() < deadline, "the stream was never cancelled"
      time.sleep(0.01)
  finally:
    scheduled.cancel = cancel
  stream = cancelled[0]
  assert stream.completion.finish_reason == "cancelled"
  assert len(stream.completion.tokens) < 120
  assert stream.ended_at_step - stream.cancelled_at_step <= 1
  assert scheduled.slots_in_use == 0
  metrics = urlopen_text(slow, "/metrics")
  assert ('rtjax_rejected_requests_total{model="slow",reason='
          '"client_disconnected"} 1.0') in metrics
  for name in ("time_to_first_token_seconds", "time_per_output_token_seconds",
               "generation_queue_seconds"):
    assert f'rtjax_{name}_count{{model="slow"}} 1.0' in metrics
  assert 'rtjax_slots_in_use{model="slow"} 0.0' in metrics


def urlopen_text(served, path: str) -> str:
  connection = http.client.HTTPConnection(served.url, timeout=30)
  connection.request("GET", path)
  return connection.getresponse().read().decode()


def test_bad_requests_get_400_with_the_reason(served):
  deep = b"[" * 50_000 + b"]" * 50_000
  for path in ("/v2/models/lm/generate", "/v1/completions"):
    _, response = post(served.url, path, deep)
    assert response.status == 400
    assert "nests deeper" in json.loads(response.read())["error"]
  cases = [
      ({"text_input": "o", "beams": 2}, "unknown parameter 'beams'"),
      ({"text_input": "o", "max_tokens": -1}, "max_tokens must be at least"),
      ({"text_input": "o" * CONTEXT}, "a prompt of 128 tokens"),
      ({"text_input": "ROMEO"}, "character 'R' is not in the vocabulary"),
      ({"text_input": "o", "temperature": "hot"}, "'temperature': 'hot'"),
  ]
  for body, reason in cases:
    _, response = post(served.url, "/v2/models/lm/generate", body)
    assert response.status == 400, body
    assert reason in json.loads(response.read())["error"]
  _, response = post(served.url, "/v1/completions",
                     {"model": "lm", "prompt": "o", "n": 2})
  assert response.status == 400
  _, response = post(served.url, "/v1/completions",
                     {"model": "nope", "prompt": "o"})
  assert response.status == 404


def test_overload_is_refused_at_once_and_admitted_streams_keep_deadlines(
    slow):
  """24 streams of 8 tokens offered at once to two slots with a 300 ms
  first-token deadline."""
  deadline_s = 0.3

  def offer(i):
    start = time.perf_counter()
    _, response = post(slow.url, "/v2/models/slow/generate_stream",
                       {"text_input": "o", "max_tokens": 8},
                       {"X-Deadline-Ms": str(deadline_s * 1e3)})
    if response.status != 200:
      return response.status, time.perf_counter() - start
    response.readline()
    first = time.perf_counter() - start
    response.read()
    return 200, first

  with ThreadPoolExecutor(24) as pool:
    results = list(pool.map(offer, range(24)))
  admitted = [t for status, t in results if status == 200]
  refused = [t for status, t in results if status == 429]
  assert len(admitted) + len(refused) == 24
  assert 2 <= len(admitted) < 24 and refused
  assert max(refused) < deadline_s  # at once, not after waiting
  assert max(admitted) <= deadline_s + STEP_S


def test_sigterm_mid_stream_finishes_the_stream_and_exits_0(checkpoint):
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}",
       f"--port={port}", "--model_names=lm", "--slots=2"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    url, deadline = f"127.0.0.1:{port}", time.time() + 120
    while True:
      assert time.time() < deadline and process.poll() is None
      try:
        connection = http.client.HTTPConnection(url, timeout=5)
        connection.request("GET", "/v2/health/ready")
        if connection.getresponse().status == 200:
          break
      except OSError:
        pass
      time.sleep(0.1)
    _, response = post(url, "/v1/completions", {
        "model": "lm", "prompt": "o", "max_tokens": 100, "stream": True,
        "seed": 2})
    first = response.readline()
    process.send_signal(signal.SIGTERM)
    rest = response.read().decode()
    assert first.startswith(b"data: ") and rest.rstrip().endswith(
        "data: [DONE]")
    chunks = [json.loads(line[6:]) for line in
              [first.decode()] + rest.splitlines()
              if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert process.wait(60) == 0
    assert b"Traceback" not in process.stderr.read()
  finally:
    if process.poll() is None:
      process.kill()
    threading.Thread(target=process.communicate, daemon=True).start()
