"""The Open Inference Protocol's HTTP endpoints as a Starlette app, each
model behind its own DeadlineBatcher.

  GET  /v2/health/live              200 once the process answers
  GET  /v2/health/ready             200 once every model is compiled and warmed
  GET  /v2                          server metadata
  GET  /v2/models/<m>[/versions/<v>]          model metadata
  GET  /v2/models/<m>[/versions/<v>]/ready    200 when that model is loaded
  POST /v2/models/<m>[/versions/<v>]/infer    JSON or binary tensors
  GET  /metrics                     Prometheus

and, for decoder language models, text generation (rtjax.serve.generating:
Triton's generate extension, OpenAI's /v1/completions and /v1/models) over a
continuous-batching scheduler per model.

An infer request's deadline is its `parameters.timeout` (microseconds,
Triton's parameter: tritonclient's `timeout=`), else its `X-Deadline-Ms`
header, else the server's default, counted from when its body was read.
Statuses: 400 malformed, 404 unknown model, 413 body too large, 429
rejected by the batcher (deadline cannot be met, queue full), 503 not ready
or shutting down, 500 a model error. Models load on a thread after the
server starts listening, so liveness answers while they compile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from typing import Callable, Mapping

from absl import logging
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rtjax.infer import scheduler as scheduler_lib
from rtjax.infer.batcher import (DeadlineBatcher, Rejected,
                                 Request as BatchRequest,
                                 measure_service_times)
from rtjax.serve import protocol
from rtjax.serve.generating import (CLIENT_GONE, REJECTION_STATUS,
                                    GenerationEndpoints, Generator,
                                    error_response)
from rtjax.serve.metrics import Metrics
from rtjax.serve.servable import Servable

SERVER_NAME = "rtjax"
SERVER_VERSION = "0.1.0"
DEADLINE_HEADER = "x-deadline-ms"


@dataclasses.dataclass
class _Loaded:
  servable: Servable
  batcher: DeadlineBatcher  # its service_s: the times it decides with


class ModelServer:
  """`loaders`: {model name: a function that builds its Servable or, for a
  language model, its Generator} (compiling it), run in order on a loading
  thread; `load_on_startup=False` leaves the call of load() to the owner (a
  test holding readiness back). `timing_calls` per bucket measure its
  service time before it is served. A generator's scheduler prefills at
  most `prefills_per_step` prompts between two generate steps and holds
  at most `max_queue_requests` waiting."""

  def __init__(self, loaders: Mapping[str, Callable[[], Servable | Generator]],
               deadline_ms: float = 100.0, max_queue_rows: int = 1024,
               max_body_bytes: int = 64 << 20, load_on_startup: bool = True,
               timing_calls: int = 20, prefills_per_step: int = 1,
               max_queue_requests: int = 256):
    self.loaders = dict(loaders)
    self.deadline_s_default = deadline_ms / 1e3
    self.max_queue_rows, self.max_body_bytes = max_queue_rows, max_body_bytes
    self.load_on_startup, self.timing_calls = load_on_startup, timing_calls
    self.prefills_per_step = prefills_per_step
    self.max_queue_requests = max_queue_requests
    self.models: dict[str, _Loaded] = {}
    self.schedulers: dict[str, scheduler_lib.Scheduler] = {}
    self.started = int(time.time())
    self.metrics = Metrics()
    self.load_error: BaseException | None = None
    self.on_load_error: Callable[[], None] = lambda: None
    self.loop: asyncio.AbstractEventLoop | None = None
    self._stopping = False
    routes = [
        Route("/v2/health/live", self.live),
        Route("/v2/health/ready", self.ready),
        Route("/v2", self.server_metadata),
        Route("/metrics", self.metrics_endpoint),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
      routes += [Route(prefix, self.model_metadata),
                 Route(prefix + "/ready", self.model_ready),
                 Route(prefix + "/infer", self.infer, methods=["POST"])]
    generation = GenerationEndpoints(self)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
      routes += [Route(prefix + "/generate", generation.generate,
                       methods=["POST"]),
                 Route(prefix + "/generate_stream", generation.generate_stream,
                       methods=["POST"])]
    routes += [Route("/v1/completions", generation.completions,
                     methods=["POST"]),
               Route("/v1/models", generation.models)]
    self.app = Starlette(routes=routes, lifespan=self._lifespan)

  # ---- lifecycle ----------------------------------------------------------

  @contextlib.asynccontextmanager
  async def _lifespan(self, app):
    del app
    self.loop = asyncio.get_running_loop()
    if self.load_on_startup:
      threading.Thread(target=self._load_guarded, daemon=True,
                       name="model-loader").start()
    yield
    self._stopping = True
    for loaded in list(self.models.values()):
      loaded.batcher.stop()  # answers what is queued
    for scheduler in list(self.schedulers.values()):
      scheduler.stop()  # finishes every admitted stream

  def _load_guarded(self) -> None:
    try:
      self.load()
    except BaseException as e:  # reported by whoever runs the server
      self.load_error = e
      self.on_load_error()

  def load(self) -> None:
    """Builds every model, times each bucket (which also warms it up), then
    opens it to requests; the server is ready once all are."""
    for name, loader in self.loaders.items():
      if name in self.models or name in self.schedulers:
        continue
      servable = loader()
      if isinstance(servable, Generator):
        self._start_generating(name, servable)
        continue
      service_s = measure_service_times(
          servable.run, servable.buckets, servable.signature.input_shape,
          protocol.DATATYPES[servable.signature.input_datatype],
          calls=self.timing_calls)
      batcher = DeadlineBatcher(
          servable.run, service_s, self._responder(),
          reject=self._rejecter(), max_queue_rows=self.max_queue_rows,
          on_batch=self._batch_observer(name))
      self.metrics.queue_rows.labels(name).set_function(
          lambda b=batcher: b.queued_rows)
      self.models[name] = _Loaded(servable, batcher)
      logging.info("model %s ready: buckets %s, service ms %s", name,
                   list(servable.buckets),
                   {b: round(s * 1e3, 3) for b, s in service_s.items()})

  def _start_generating(self, name: str, generator: Generator) -> None:
    """The generator's scheduler on its own thread, after measuring its
    prefill and step times (which also warms it up)."""
    prefill_s, step_s = scheduler_lib.measure_times(generator.engine)
    scheduler = scheduler_lib.Scheduler(
        generator.engine, self.prefills_per_step, self.max_queue_requests,
        prefill_s, step_s, observe=self.metrics.generation_observer(name))
    self.metrics.watch_scheduler(name, scheduler)
    scheduler.start()
    self.schedulers[name] = scheduler
    logging.info("model %s generating: %d slots, step %.3f ms, prefill ms "
                 "%s", name, generator.engine.slots, step_s * 1e3,
                 {b: round(s * 1e3, 3) for b, s in prefill_s.items()})

  @property
  def is_ready(self) -> bool:
    return (not self._stopping and self.load_error is None
            and set(self.models) | set(self.schedulers) == set(self.loaders))

  # ---- from the batcher's threads to the event loop -------------------------

  def _responder(self):
    def resolve(pairs):
      for request, rows in pairs:
        if not request.tag.done():
          request.tag.set_result(rows)
    return lambda pairs: self.loop.call_soon_threadsafe(resolve, pairs)

  def _rejecter(self):
    def fail(future, error):
      if not future.done():
        future.set_exception(error)
    return lambda request, error: self.loop.call_soon_threadsafe(
        fail, request.tag, error)

  def _batch_observer(self, name: str):
    rows_h = self.metrics.batch_rows.labels(name)
    seconds_h = self.metrics.batch_seconds.labels(name)
    def observe(rows, bucket, seconds):
      del bucket
      rows_h.observe(rows)
      seconds_h.observe(seconds)
    return observe

  # ---- endpoints --------------------------------------------------------------

  async def live(self, request: Request) -> Response:
    return Response(status_code=200)

  async def ready(self, request: Request) -> Response:
    return Response(status_code=200 if self.is_ready else 503)

  async def server_metadata(self, request: Request) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION,
                         "extensions": ["binary_tensor_data", "generate"]})

  async def metrics_endpoint(self, request: Request) -> Response:
    body, content_type = self.metrics.exposition()
    return Response(body, media_type=content_type)

  def unavailable(self, name: str) -> Response | None:
    """404 for a model the server does not have, 503 for one still
    loading; None for a model that serves (classifier or generator)."""
    if name not in self.loaders:
      return error_response(404, f"unknown model {name!r}; models: "
                            f"{', '.join(self.loaders)}")
    if name not in self.models and name not in self.schedulers:
      return error_response(503, f"model {name!r} is still loading")
    return None

  def _model(self, request: Request) -> _Loaded | Response:
    name = request.path_params["name"]
    missing = self.unavailable(name)
    if missing is not None:
      return missing
    if name in self.schedulers:
      return error_response(400, f"model {name!r} generates text: use its "
                            "/generate or /v1/completions")
    loaded = self.models[name]
    version = request.path_params.get("version")
    if version is not None and version != loaded.servable.version:
      return error_response(404, f"model {name!r} has no version "
                            f"{version!r}; versions: "
                            f"{loaded.servable.version}")
    return loaded

  async def model_metadata(self, request: Request) -> Response:
    name = request.path_params["name"]
    if name in self.schedulers:  # as Triton describes a text model
      return JSONResponse({
          "name": name, "versions": ["1"], "platform": "rtjax_generate",
          "inputs": [{"name": "text_input", "datatype": "BYTES",
                      "shape": [1]}],
          "outputs": [{"name": "text_output", "datatype": "BYTES",
                       "shape": [-1]}]})
    loaded = self._model(request)
    if isinstance(loaded, Response):
      return loaded
    s = loaded.servable
    return JSONResponse(s.signature.metadata(s.name, s.version, s.platform))

  async def model_ready(self, request: Request) -> Response:
    if request.path_params["name"] in self.schedulers:
      return Response(status_code=503 if self._stopping else 200)
    loaded = self._model(request)
    if isinstance(loaded, Response):
      return Response(status_code=loaded.status_code)
    return Response(status_code=503 if self._stopping else 200)

  async def infer(self, request: Request) -> Response:
    name = request.path_params["name"]
    loaded = self._model(request)
    if isinstance(loaded, Response):
      self.metrics.requests.labels(name, str(loaded.status_code)).inc()
      if loaded.status_code == 503:
        self.metrics.rejected.labels(name, "not_ready").inc()
      return loaded
    response = await self._infer(name, loaded, request)
    self.metrics.requests.labels(name, str(response.status_code)).inc()
    return response

  async def _infer(self, name: str, loaded: _Loaded, request: Request
                   ) -> Response:
    servable, rejected = loaded.servable, self.metrics.rejected
    try:
      body = await self.read_body(request)
      start = time.perf_counter()
      parsed = protocol.parse_infer(
          body, request.headers.get(protocol.HEADER_LENGTH),
          servable.signature, loaded.batcher.max_rows)
      deadline = start + self.deadline_s(parsed.parameters, request)
    except protocol.ProtocolError as e:
      rejected.labels(name, "too_large" if e.status == 413
                      else "bad_request").inc()
      return error_response(e.status, str(e))
    except ClientDisconnect:
      rejected.labels(name, "client_disconnected").inc()
      return Response(status_code=CLIENT_GONE)
    future = self.loop.create_future()
    try:
      loaded.batcher.submit(BatchRequest(parsed.inputs, deadline, future,
                                         start))
      in_flight = self.metrics.in_flight.labels(name)
      in_flight.inc()
      try:
        outputs = await future
      finally:
        in_flight.dec()
    except Rejected as e:
      rejected.labels(name, e.reason).inc()
      return error_response(REJECTION_STATUS[e.reason],
                            f"rejected ({e.reason}): {e}")
    except Exception as e:  # the model failed: this batch, not the server
      logging.exception("model %s failed", name)
      return error_response(500, f"model {name!r} failed: "
                            f"{type(e).__name__}: {e}")
    body, headers = protocol.encode_infer(
        name, servable.version, parsed, outputs, servable.signature)
    self.metrics.latency.labels(name).observe(time.perf_counter() - start)
    return Response(body, headers=headers, media_type=(
        "application/octet-stream" if headers else "application/json"))

  async def read_body(self, request: Request) -> bytes:
    """The body, or ProtocolError(413) past max_body_bytes. Up to 4x that is
    read and dropped first, so that a client still sending gets the answer
    rather than a broken connection; a longer one is cut at once."""
    too_large = protocol.ProtocolError(
        f"the request body exceeds {self.max_body_bytes} bytes", 413)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(
        length) > 4 * self.max_body_bytes:
      raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size <= self.max_body_bytes:
        chunks.append(chunk)
      elif size > 4 * self.max_body_bytes:
        break
    if size > self.max_body_bytes:
      raise too_large
    return b"".join(chunks)

  def deadline_s(self, parameters: dict, request: Request,
                 default_s: float | None = None) -> float:
    """A request's deadline in seconds from now: its `parameters.timeout`
    (microseconds), else its X-Deadline-Ms header, else `default_s` (the
    server's deadline when None)."""
    timeout_us = parameters.get("timeout")
    if timeout_us is not None:
      if (not isinstance(timeout_us, (int, float)) or isinstance(timeout_us, bool)
          or not 0 < timeout_us < math.inf):
        raise protocol.ProtocolError(f"parameters.timeout {timeout_us!r}: give"
                                     " a positive number of microseconds")
      return timeout_us / 1e6
    header = request.headers.get(DEADLINE_HEADER)
    if header is not None:
      try:
        deadline_ms = float(header)
      except ValueError:
        deadline_ms = -1.0
      if not 0 < deadline_ms < math.inf:
        raise protocol.ProtocolError(f"X-Deadline-Ms {header!r}: give a "
                                     "positive number of milliseconds")
      return deadline_ms / 1e3
    return self.deadline_s_default if default_s is None else default_s
