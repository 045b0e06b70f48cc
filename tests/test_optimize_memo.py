"""The search does each thing once: a memo of compiled models keyed by
structure, weights, batch size and serving options; and when the parent's
latency moved between phases beyond its noise, the phase is measured again
(an injected timer, no sleeps)."""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax import models
from rtjax.infer.cache import enable_compilation_cache
from rtjax.optimize import drift, memo, report, search, serving
from rtjax.optimize.settings import Settings
from rtjax.optimize.store import SearchStore

SPEC = {"name": "mlp", "args": {"input_shape": [8], "hidden": [16],
                                "num_classes": 3}}
OPTIONS = {"conv_lowering": "xla", "embed_weights": False, "dtype": "float32",
           "round_widths_to": 0, "dot_kernels": "xla"}


class FakeCompiled:
  """What the memo needs of a CompiledModel; 'auto' picks a lowering."""

  def __init__(self, options, batch):
    self.conv_lowering = {batch: {"conv1": (4, 4)} if options[
        "conv_lowering"] == "auto" else {}}


@pytest.fixture
def compiles(monkeypatch):
  calls = []

  def compile_with(model, spec, batch, options):
    calls.append((spec["name"], batch, dict(options)))
    return FakeCompiled(options, batch)

  monkeypatch.setattr(serving, "compile_with", compile_with)
  return calls


def test_the_memo_compiles_each_key_once(compiles):
  model = models.create_model(SPEC["name"], SPEC["args"], 0)
  other = models.create_model(SPEC["name"], SPEC["args"], 1)  # other weights
  m = memo.CompileMemo()
  first = m.compile(model, SPEC, 8, OPTIONS)
  assert m.compile(model, SPEC, 8, dict(OPTIONS)) is first
  assert m.compile(other, SPEC, 8, OPTIONS) is not first
  assert m.compile(model, SPEC, 16, OPTIONS) is not first
  assert m.compile(model, SPEC, 8, {**OPTIONS, "embed_weights": True}) \
      is not first
  assert len(compiles) == 4
  # The same weights in another module object are the same key.
  graphdef, state = nnx.split(model)
  assert m.compile(nnx.merge(graphdef, state), SPEC, 8, OPTIONS) is first
  # What 'auto' chose, pinned, is the program 'auto' compiled.
  auto = m.compile(model, SPEC, 8, {**OPTIONS, "conv_lowering": "auto"})
  assert m.compile(model, SPEC, 8, {**OPTIONS, "conv_lowering":
                                    "conv1:4x4"}) is auto
  assert len(compiles) == 5
  summary = m.summary()
  assert summary["keys"] == summary["compiles"] == 5
  assert summary["most_compiles_of_one_key"] == 1 and summary["reused"] == 3


def test_a_search_caches_its_programs_in_its_workdir_unless_told(tmp_path):
  own = str(tmp_path / memo.CACHE_SUBDIR)
  assert memo.compilation_cache_dir(tmp_path, "", None) == own
  assert memo.compilation_cache_dir(tmp_path, "", "/suite") == "/suite"
  assert memo.compilation_cache_dir(tmp_path, "/mine", "/suite") == "/mine"
  assert memo.compilation_cache_dir(tmp_path, "none", "/suite") is None


def test_other_passed_weights_load_the_program_from_the_cache():
  """Passed weights are arguments: a model with other weights is its own
  key, but its build loads the executable XLA compiled for the first."""
  enable_compilation_cache(jax.config.jax_compilation_cache_dir)
  model = models.create_model(SPEC["name"], SPEC["args"], 0)
  other = models.create_model(SPEC["name"], SPEC["args"], 1)
  m = memo.CompileMemo()
  first = m.compile(model, SPEC, 8, OPTIONS)
  second = m.compile(other, SPEC, 8, OPTIONS)
  entry = m.entries[m.key(other, SPEC, 8, OPTIONS)]
  assert entry["compiles"] == 1 and entry["programs_from_cache"] >= 1
  assert m.summary()["programs_from_cache"] >= 1
  x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
  np.testing.assert_allclose(second(x), other(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(first(x), second(x))


# ---- the parent's latency between phases ---------------------------------------

def _row(p_ms, runs=(0.98, 1.0, 1.02)):
  return {"p_ms": p_ms, "p50_ms": p_ms / 2,
          "p_ms_runs": [p_ms * r for r in runs]}


class Timer:
  """serving.repeated's stand-in: the parent's p_ms per call, scripted."""

  def __init__(self, *parent_p_ms):
    self.script, self.calls = list(parent_p_ms), 0

  def __call__(self, served, batch, percentile, seconds, runs):
    self.calls += 1
    p = self.script.pop(0)
    return [_row(p)] + [_row(0.5) for _ in served[1:]]


def _ctx(tmp_path, timer):
  return types.SimpleNamespace(settings=Settings(latency_budget_ms=1.0),
                               store=SearchStore(tmp_path), batch=8,
                               timer=timer)


@pytest.mark.parametrize("script, calls, settled", [
    ((1.01,), 1, None),       # within the noise it measured (4%): once
    ((1.5, 1.0), 2, True),    # moved, measured again: back
    ((1.5, 1.6), 2, False)])  # moved twice: the report says so
def test_a_phase_is_measured_again_when_the_parent_moved(
    tmp_path, script, calls, settled):
  timer = Timer(*script)
  ctx = _ctx(tmp_path, timer)
  latency = search._steady_latency(ctx, "final_latency",
                                   {"parent": None, "a": None},
                                   ("screening", _row(1.0)))
  assert timer.calls == calls
  assert latency["parent"]["p_ms"] == script[-1]
  notes = ctx.store.get("parent_drift", {})
  if settled is None:
    assert notes == {}
    return
  [note] = notes.values()
  assert ("not comparable" in note) == (not settled)
  assert "moved from 1 ms (screening) to 1.5 ms" in note
  header = "\n".join(report._header({
      "parent": "p", "settings": {"percentile": 99, "batch_size": 8,
                                  "max_accuracy_drop": 1,
                                  "search_minutes": 1},
      "budget": {"budget_ms": 1.0, "from": "given"}, "spent_seconds": 1,
      "rung_steps": [1], "parent_options": {"options": {}},
      "sensitivity": {"groups": [], "int8": []}, "parent_drift": notes}))
  assert note in header


def test_no_measured_noise_never_counts_as_moved():
  single = {"p_ms": 1.0, "p_ms_runs": [1.0]}
  assert not drift.moved(single, {"p_ms": 2.0})
  assert drift.moved(_row(1.0), single | {"p_ms": 2.0})
