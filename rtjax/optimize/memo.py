"""The compiled models of one search, so that no model is compiled twice:
the option grid, screening, the sensitivity, the budget and the final runs
ask for the same parent (and every finalist again) with the same options.

A compiled model is known by its structure (the spec), a digest of its
weights (embedded weights are constants of the executable, and a compiled
model holds its weights either way), the batch size and the serving
options. The memo counts the compiles per key and their seconds for the
report.

Below the memo, a search's persistent XLA compilation cache (on by default
in `python -m experiments.optimize`, under the workdir) keeps every program
XLA compiled, so that a program met again is loaded, not compiled: a model
that differs from one built before only in weights it takes as arguments
(the executable depends on the structure, batch and options alone), and
every program of a search that resumes. The memo counts per key the
programs its build loaded from that cache.
"""

from __future__ import annotations

import json
import time
from typing import Callable

from etils import epath
from flax import nnx

from rtjax.checkpoint.stamp import params_digest
from rtjax.infer import CompiledModel
from rtjax.infer.cache import cache_counts
from rtjax.infer import lowering as lowering_lib
from rtjax.optimize import estimated, serving
from rtjax.target import Target


CACHE_SUBDIR = "xla_cache"


def compilation_cache_dir(workdir, requested: str,
                          configured: str | None) -> str | None:
  """The persistent compilation cache a search uses: the one `requested`
  ('none': none), else the one the process already has (e.g. the test
  suite's, from JAX_COMPILATION_CACHE_DIR), else its own in the workdir."""
  if requested:
    return None if requested == "none" else requested
  return configured or str(epath.Path(workdir) / CACHE_SUBDIR)


def weights_digest(model: nnx.Module) -> str:
  return params_digest(nnx.to_pure_dict(nnx.state(model)))


def _key(spec: dict, digest: str, batch: int, options: dict) -> str:
  return json.dumps({"spec": spec, "weights": digest, "batch": batch,
                     "options": options}, sort_keys=True, default=str)


class CompileMemo:
  """compile(model, spec, batch, options): serving.compile_with, once per
  key; the figures of each key in `entries`. With a `target` slice, each
  model is compiled for the slice and, for its predictions, for this host
  in the same dtype (rtjax.optimize.estimated; the host twin once per
  weights, batch and dtype)."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter,
               target: Target | None = None):
    self._clock = clock
    self.target = target
    self._hosts: dict[str, CompiledModel] = {}
    self._models: dict[str, CompiledModel] = {}
    self.entries: dict[str, dict] = {}  # key -> what the report says of it
    self._aliases: dict[str, str] = {}  # another key of the same program

  def key(self, model: nnx.Module, spec: dict, batch: int,
          options: dict) -> str:
    return _key(spec, weights_digest(model), batch, options)

  def compile(self, model: nnx.Module, spec: dict, batch: int,
              options: dict) -> CompiledModel:
    digest = weights_digest(model)
    key = _key(spec, digest, batch, options)
    if key in self._models:
      self.entries[self._aliases.get(key, key)]["reused"] += 1
      return self._models[key]
    start, hits = self._clock(), cache_counts().get("cache_hits", 0)
    self._models[key] = self._build(model, spec, batch, options, digest)
    self.entries[key] = {
        "model": spec["name"], "args": spec["args"], "weights": digest[:12],
        "batch": batch, "options": options, "compiles": 1,
        "seconds": self._clock() - start, "reused": 0,
        "programs_from_cache": cache_counts().get("cache_hits", 0) - hits}
    chosen = self._models[key].conv_lowering.get(batch)
    if options.get("conv_lowering") == "auto" and chosen:
      # What 'auto' chose, pinned, is the program it compiled.
      pinned = _key(spec, digest, batch, {
          **options, "conv_lowering": lowering_lib.describe(chosen)})
      self._models.setdefault(pinned, self._models[key])
      self._aliases.setdefault(pinned, key)
    return self._models[key]

  def _build(self, model: nnx.Module, spec: dict, batch: int, options: dict,
             digest: str):
    if self.target is None:
      return serving.compile_with(model, spec, batch, options)
    host_options = {"dtype": options["dtype"]}  # the predictions' numerics
    host_key = _key(spec, digest, batch, host_options)
    if host_key not in self._hosts:
      self._hosts[host_key] = serving.compile_with(model, spec, batch,
                                                   host_options)
    return estimated.build(self.target, model, spec, batch, options,
                           self._hosts[host_key])

  def summary(self) -> dict:
    """For the report: every key with its compiles, and the totals."""
    entries = list(self.entries.values())
    return {"keys": len(entries),
            "compiles": sum(e["compiles"] for e in entries),
            "most_compiles_of_one_key": max(
                (e["compiles"] for e in entries), default=0),
            "reused": sum(e["reused"] for e in entries),
            "compile_seconds": sum(e["seconds"] for e in entries),
            "programs_from_cache": sum(e["programs_from_cache"]
                                       for e in entries),
            "per_key": entries}
