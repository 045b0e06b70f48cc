"""The two text-generation protocols the server speaks, parsed into one
generation Request and answered in each one's own shapes:

  Triton's generate extension: POST .../generate and .../generate_stream
    {"text_input": "...", "parameters": {"max_tokens": 16, ...}} (parameters
    may also sit at the top level) -> {"model_name", "model_version",
    "text_output"}; the stream is Server-Sent Events, one per token.
  OpenAI's completions: POST /v1/completions {"model", "prompt",
    "max_tokens", "temperature", "top_p", "seed", "stop", "stream"} ->
    a text_completion with finish_reason and usage; streamed as chunks and
    a final `data: [DONE]`.

Anything else in a body is a ProtocolError (400) that names it.
"""

from __future__ import annotations

import json
import secrets

from rtjax.errors import InputError
from rtjax.infer.generation import Request
from rtjax.infer.sampling import Sampling
from rtjax.serve.protocol import ProtocolError, load_object

# Each parameter and the JSON types it takes.
PARAMETERS = {"max_tokens": (int,), "temperature": (int, float),
              "top_k": (int,), "top_p": (int, float), "seed": (int,),
              "stop": (str, list)}
# OpenAI fields accepted only at their default (what rtjax does not do).
OPENAI_DEFAULTS = {"n": 1, "best_of": 1, "echo": False, "logprobs": None,
                   "frequency_penalty": 0, "presence_penalty": 0,
                   "suffix": None, "logit_bias": None, "user": None}
OPENAI_MAX_TOKENS = 16  # OpenAI's default
DONE = b"data: [DONE]\n\n"


def _checked(values: dict) -> dict:
  for key, value in values.items():
    if key not in PARAMETERS:
      raise ProtocolError(f"unknown parameter {key!r}; known: "
                          f"{', '.join(PARAMETERS)}")
    if isinstance(value, bool) or not isinstance(value, PARAMETERS[key]):
      raise ProtocolError(f"parameter {key!r}: {value!r} is not a "
                          f"{' or '.join(t.__name__ for t in PARAMETERS[key])}")
  stop = values.get("stop", [])
  stop = [stop] if isinstance(stop, str) else stop
  if not all(isinstance(s, str) for s in stop):
    raise ProtocolError("parameter 'stop': give a string or a list of "
                        "strings")
  return {**values, "stop": tuple(stop)}


def _request(prompt, values: dict, max_tokens: int,
             temperature: float) -> Request:
  if not isinstance(prompt, str):
    raise ProtocolError("the prompt must be a string")
  values = _checked(values)
  temperature = float(values.get("temperature", temperature))
  try:
    return Request(prompt, values.get("max_tokens", max_tokens), Sampling(
        temperature, values.get("top_k", Sampling.top_k),
        float(values.get("top_p", Sampling.top_p)),
        values.get("seed", secrets.randbelow(2**32) if temperature
                   else Sampling.seed)), values["stop"])
  except InputError as e:
    raise ProtocolError(str(e)) from None


def parse_generate(body: bytes) -> tuple[Request, dict]:
  """(Request, the rest of `parameters`: `timeout`, microseconds to the
  first token, as /infer takes it). Greedy and 64 tokens unless told."""
  request = load_object(body, "'text_input'")
  parameters = request.pop("parameters", {})
  if not isinstance(parameters, dict):
    raise ProtocolError("'parameters' must be a JSON object")
  if "text_input" not in request:
    raise ProtocolError("the request needs 'text_input'")
  prompt = request.pop("text_input")
  request.pop("id", None)
  rest = {"timeout": parameters.pop("timeout")} if "timeout" in parameters \
      else {}
  return _request(prompt, {**request, **parameters}, Request.max_tokens,
                  Sampling.temperature), rest


def parse_completion(body: bytes) -> tuple[str, Request, bool, bool]:
  """(model, Request, stream, include usage in the stream) of an OpenAI
  completions body; OpenAI's defaults: 16 tokens at temperature 1 (a random
  seed unless given)."""
  request = load_object(body, "'model' and 'prompt'")
  for key in ("model", "prompt"):
    if key not in request:
      raise ProtocolError(f"the request needs {key!r}")
  model, prompt = request.pop("model"), request.pop("prompt")
  if isinstance(prompt, list) and len(prompt) == 1:
    prompt = prompt[0]
  stream = request.pop("stream", False)
  options = request.pop("stream_options", None) or {}
  if not isinstance(stream, bool) or not isinstance(options, dict):
    raise ProtocolError("'stream' must be a boolean and 'stream_options' an "
                        "object")
  for key, default in OPENAI_DEFAULTS.items():
    value = request.pop(key, default)
    if value != default and key != "user":
      raise ProtocolError(f"{key!r}={value!r} is not supported (only "
                          f"{default!r})")
  return (str(model), _request(prompt, request, OPENAI_MAX_TOKENS, 1.0),
          stream, bool(options.get("include_usage")))


def sse(event: dict) -> bytes:
  """One Server-Sent Event carrying `event` as JSON."""
  return b"data: " + json.dumps(event).encode() + b"\n\n"


def completion(id: str, model: str, created: int, text: str,
               finish_reason: str | None, usage: dict | None = None) -> dict:
  """A text_completion (or, streaming, one chunk of it)."""
  body = {"id": id, "object": "text_completion", "created": created,
          "model": model, "choices": [{"text": text, "index": 0,
                                       "logprobs": None,
                                       "finish_reason": finish_reason}]}
  if usage is not None:
    body["usage"] = usage
  return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens,
          "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}
