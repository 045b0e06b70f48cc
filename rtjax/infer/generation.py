"""A generation request, its completion, and one request's bookkeeping
while it holds a slot (rtjax.infer.scheduler runs them): it ends at a stop
string, at its token limit, or when its sequence fills the context.

Text is streamed as it is decided: characters that could still begin a
stop string are held back until the next token settles it, so no part of a
stop string ever reaches the caller.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rtjax.errors import InputError
from rtjax.infer.engine import Engine
from rtjax.infer.sampling import GREEDY, Sampling


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: str
  max_tokens: int = 64
  sampling: Sampling = GREEDY
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    if self.max_tokens < 1:
      raise InputError(f"max_tokens must be at least 1, got "
                       f"{self.max_tokens}")
    if any(not s for s in self.stop):
      raise InputError("stop strings must not be empty")


@dataclasses.dataclass
class Completion:
  """A finished request: its text (up to any stop string), its tokens,
  why it ended ('stop' or 'length') and when each token reached the host."""
  request: Request
  text: str = ""
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str = ""
  arrived: float = 0.0  # perf_counter seconds
  token_times: list[float] = dataclasses.field(default_factory=list)
  streamed: int = 0  # characters handed to the caller so far

  @property
  def ttft_s(self) -> float:
    """Arrival to first token, queueing included."""
    return self.token_times[0] - self.arrived

  @property
  def tpot_s(self) -> float:
    """(last token time - first token time) / (tokens - 1), as MLPerf
    defines time per output token; nan for a single token."""
    if len(self.token_times) < 2:
      return float("nan")
    return ((self.token_times[-1] - self.token_times[0])
            / (len(self.token_times) - 1))


def held_back(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters of `text` could begin a stop string."""
  longest = 0
  for stop in stops:
    for size in range(min(len(stop) - 1, len(text)), longest, -1):
      if text.endswith(stop[:size]):
        longest = size
        break
  return longest


class Running:
  """One request's bookkeeping while it holds a slot."""

  def __init__(self, engine: Engine, completion: Completion, prompt_tokens):
    self.engine, self.completion = engine, completion
    self.room = engine.context - len(prompt_tokens)  # tokens it may add

  def add(self, token: int, now: float) -> bool:
    """Takes a generated token; True when the request has ended."""
    c, request = self.completion, self.completion.request
    c.tokens.append(int(token))
    c.token_times.append(now)
    before = len(c.text)
    c.text += self.engine.decode([token])
    # A new match ends in the new text (an older one ended the request).
    found = [i for i in (c.text.find(s, max(0, before - len(s) + 1))
                         for s in request.stop) if i >= 0]
    if found:
      c.text, c.finish_reason = c.text[:min(found)], "stop"
    elif len(c.tokens) >= min(request.max_tokens, self.room):
      c.finish_reason = "length"
    return bool(c.finish_reason)

  def decided(self) -> str:
    """Text not yet streamed that no stop string can take back."""
    c = self.completion
    end = len(c.text) if c.finish_reason else (
        len(c.text) - held_back(c.text, c.request.stop))
    new, c.streamed = c.text[c.streamed:end], max(c.streamed, end)
    return new


def summary(completions: Sequence[Completion]) -> dict[str, float]:
  """TTFT and TPOT percentiles (ms) and tokens per second of a run."""
  ttft = np.array([c.ttft_s for c in completions]) * 1e3
  tpot = np.array([c.tpot_s for c in completions if len(c.tokens) > 1]) * 1e3
  start = min(c.arrived for c in completions)
  end = max(c.token_times[-1] for c in completions)
  tokens = sum(len(c.tokens) for c in completions)
  stats = {"requests": len(completions), "tokens": tokens,
           "tokens_per_s": tokens / (end - start)}
  for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
    if len(values):
      stats[f"{name}_p50"] = float(np.percentile(values, 50))
      stats[f"{name}_p99"] = float(np.percentile(values, 99))
  return stats
