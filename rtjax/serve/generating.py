"""The server's text-generation endpoints, thin layers over one Scheduler
per decoder model (rtjax.infer.scheduler):

  POST /v2/models/<m>[/versions/<v>]/generate         Triton's generate
  POST /v2/models/<m>[/versions/<v>]/generate_stream  ... as Server-Sent Events
  POST /v1/completions                                OpenAI, streamed or not
  GET  /v1/models                                     OpenAI's model list

A first-token deadline comes from `parameters.timeout` (microseconds, as
/infer) or the X-Deadline-Ms header; without one a request waits its turn.
Statuses: 400 malformed or a prompt the model cannot take (named), 404
unknown model, 429 not admitted (deadline, queue_full), 503 loading or
shutting down. A client that leaves mid-stream cancels its request: the
scheduler frees its slot at its next step (counted as
rejected{reason="client_disconnected"}).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rtjax.errors import InputError
from rtjax.infer.batcher import Rejected
from rtjax.infer.engine import Engine
from rtjax.infer.scheduler import Scheduler, Stream
from rtjax.serve import completions
from rtjax.serve.protocol import ProtocolError, error_body

REJECTION_STATUS = {"deadline": 429, "queue_full": 429, "stopping": 503}
CLIENT_GONE = 499  # nginx's "client closed request"


@dataclasses.dataclass
class Generator:
  """What the server needs of a decoder: its engine (compiled) and name."""
  name: str
  engine: Engine


@dataclasses.dataclass
class _Answer:
  """A submitted request's events, as the event loop receives them."""
  model: str
  stream: Stream
  events: asyncio.Queue
  ended: bool = False


class GenerationEndpoints:
  """Routes of `server` (a ModelServer: its loop, metrics, body reading,
  deadlines and model lookup) for its generators' schedulers."""

  def __init__(self, server):
    self.server = server

  def scheduler(self, name: str) -> Scheduler | Response:
    """The model's scheduler, or the error response for its name."""
    missing = self.server.unavailable(name)
    if missing is not None:
      return missing
    scheduler = self.server.schedulers.get(name)
    if scheduler is None:
      return error_response(400, f"model {name!r} is not a language "
                            "model: use /infer")
    return scheduler

  async def models(self, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": self.server.started,
         "owned_by": "rtjax"} for name in self.server.schedulers]})

  async def generate(self, request: Request) -> Response:
    return await self._triton(request, stream=False)

  async def generate_stream(self, request: Request) -> Response:
    return await self._triton(request, stream=True)

  async def _triton(self, request: Request, stream: bool) -> Response:
    name = request.path_params["name"]
    version = request.path_params.get("version", "1")
    if version != "1":
      return self._count(name, error_response(
          404, f"model {name!r} has no version {version!r}; versions: 1"))
    parsed = await self._parse(name, request, completions.parse_generate)
    if isinstance(parsed, Response):
      return parsed
    generation_request, rest = parsed
    answer = self._submit(name, request, generation_request, rest)
    if isinstance(answer, Response):
      return answer
    shape = lambda text: {"model_name": name, "model_version": version,
                          "text_output": text}
    if not stream:
      text, _ = await self._whole(answer)
      return self._count(name, JSONResponse(shape(text)))
    async def events():
      async for text, done in self._pieces(answer):
        if text:
          yield completions.sse(shape(text))
    return self._count(name, StreamingResponse(
        events(), media_type="text/event-stream"))

  async def completions(self, request: Request) -> Response:
    parsed = await self._parse(None, request, completions.parse_completion)
    if isinstance(parsed, Response):
      return parsed
    name, generation_request, stream, include_usage = parsed
    answer = self._submit(name, request, generation_request, {})
    if isinstance(answer, Response):
      return answer
    id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    chunk = lambda text, reason, usage=None: completions.completion(
        id, name, created, text, reason, usage)
    if not stream:
      text, done = await self._whole(answer)
      return self._count(name, JSONResponse(chunk(
          text, done.finish_reason, _usage(answer))))
    async def events():
      async for text, done in self._pieces(answer):
        yield completions.sse(chunk(text, done.finish_reason if done
                                    else None))
      if include_usage:
        usage = {**chunk("", None, _usage(answer)), "choices": []}
        yield completions.sse(usage)
      yield completions.DONE
    return self._count(name, StreamingResponse(
        events(), media_type="text/event-stream"))

  # ---- the steps every endpoint shares ----------------------------------------

  async def _parse(self, name, request: Request, parse):
    """The parsed body, or the error response (counted under `name`, or
    the model the body names)."""
    try:
      return parse(await self.server.read_body(request))
    except ProtocolError as e:
      self._reject(name or "", "too_large" if e.status == 413
                   else "bad_request")
      return self._count(name or "", error_response(e.status, str(e)))
    except ClientDisconnect:
      self._reject(name or "", "client_disconnected")
      return Response(status_code=CLIENT_GONE)

  def _submit(self, name: str, request: Request, generation_request,
              parameters: dict) -> _Answer | Response:
    """The request queued on the model's scheduler with its first-token
    deadline, its events bound for this event loop; or the error."""
    scheduler = self.scheduler(name)
    if isinstance(scheduler, Response):
      return self._count(name, scheduler)
    loop, events = self.server.loop, asyncio.Queue()
    post = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)
    try:
      deadline = time.perf_counter() + self.server.deadline_s(
          parameters, request, default_s=math.inf)
      stream = scheduler.submit(
          generation_request, deadline,
          on_text=lambda text: post((text, None)),
          on_end=lambda completion: post(("", completion)))
    except (ProtocolError, InputError) as e:
      self._reject(name, "bad_request")
      return self._count(name, error_response(400, str(e)))
    except Rejected as e:
      self._reject(name, e.reason)
      return self._count(name, error_response(
          REJECTION_STATUS[e.reason], f"rejected ({e.reason}): {e}"))
    return _Answer(name, stream, events)

  async def _pieces(self, answer: _Answer):
    """(text, None) as the text is decided, then ("", completion); a
    client that leaves cancels the request."""
    try:
      while True:
        text, done = await answer.events.get()
        if done is not None:
          answer.ended = True
        yield text, done
        if done is not None:
          return
    finally:
      if not answer.ended:
        self.server.schedulers[answer.model].cancel(answer.stream)
        self._reject(answer.model, "client_disconnected")

  async def _whole(self, answer: _Answer):
    """(the whole text, the completion) once the request ends."""
    pieces = [piece async for piece in self._pieces(answer)]
    return "".join(text for text, _ in pieces), pieces[-1][1]

  def _reject(self, name: str, reason: str) -> None:
    self.server.metrics.rejected.labels(name, reason).inc()

  def _count(self, name: str, response: Response) -> Response:
    self.server.metrics.requests.labels(name, str(response.status_code)).inc()
    return response


def _usage(answer: _Answer) -> dict:
  return completions.usage(len(answer.stream.prompt),
                           len(answer.stream.completion.tokens))


def error_response(status: int, message: str) -> Response:
  """A JSON error body ({"error": message}) with its status."""
  return Response(error_body(message), status_code=status,
                  media_type="application/json")
