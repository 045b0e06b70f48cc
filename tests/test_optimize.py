"""rtjax.optimize: the statistics on known inputs, successive halving's
resume and time limit with a fake clock, a tiny search end to end (killed
after its first candidate, resumed, rerun), the audit on a candidate built
to be slower, and an impossible budget through the command line."""

import itertools
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from rtjax.optimize import (audit, candidates, finetune, halving, memo,
                            screening, serving, stats)
from rtjax.optimize.search import SCREENED_OPTIONS, Settings, run_search
from rtjax.optimize.store import SearchStore
from tests.conftest import built_once, run_module

# Two candidates (uniform 50% and 25%), one short rung, the sensitivity of
# one group, no int8, no banded lowering search, short timing runs (one each).
TINY = dict(batch_size=8, percentile=90, rung_steps=(4,), extra_rungs=0,
            keep_fractions=(0.5,), sensitivity_groups="stream1",
            uniform=(0.5, 0.25), thresholds=(),
            shallow=False, int8=False, max_candidates=2, max_finalists=2,
            measure_seconds=0.2, final_seconds=0.4, final_runs=1,
            auto_lowering=False,
            search_minutes=30, latency_budget_ms=1e4, max_accuracy_drop=100)


def fake_clock():
  """One second per reading: durations, and so decisions, repeat exactly."""
  counter = itertools.count()
  return lambda: float(next(counter))


# ---- statistics ------------------------------------------------------------

def test_wilson_interval_matches_scipy_and_stays_in_range():
  for correct, total in ((950, 1000), (97, 100), (360, 360), (0, 20)):
    expected = scipy_stats.binomtest(correct, total).proportion_ci(
        0.95, method="wilson")
    low, high = stats.wilson_interval(correct, total)
    assert low == pytest.approx(expected.low, abs=1e-9)
    assert high == pytest.approx(expected.high, abs=1e-9)
    assert 0.0 <= low <= correct / total <= high <= 1.0


def test_mcnemar_exact_on_known_counts():
  # 10 examples only the reference gets right, 2 only the other:
  # p = 2 * P(X <= 2 | n = 12, 1/2) = 2 * (1 + 12 + 66) / 4096.
  ref = np.array([1] * 10 + [0] * 2 + [1] * 50 + [0] * 5, bool)
  other = np.array([0] * 10 + [1] * 2 + [1] * 50 + [0] * 5, bool)
  test = stats.mcnemar(ref, other)
  assert (test["only_reference"], test["only_other"]) == (10, 2)
  assert test["p_value"] == pytest.approx(158 / 4096)
  assert test["p_value"] == pytest.approx(
      scipy_stats.binomtest(2, 12, 0.5).pvalue)
  assert stats.mcnemar(ref, ref)["p_value"] == 1.0


def test_a_small_drop_on_1000_examples_is_not_significant():
  # 0.3 points: 3 examples lost, none gained.
  ref = np.ones(1000, bool)
  ref[:50] = False
  other = ref.copy()
  other[100:103] = False
  result = stats.compare_to_reference(ref, other)
  assert result["change"] == pytest.approx(-0.003)
  assert result["p_value"] == pytest.approx(0.25)
  assert not result["significant"]
  low, high = result["change_ci95"]
  assert low < result["change"] < high and low < 0
  # 30 lost of 30 discordant is significant.
  other[100:130] = False
  assert stats.compare_to_reference(ref, other)["significant"]


def test_over_budget_candidates_rank_by_their_steadier_p50_ratio(tmp_path):
  # One noisy screening run put `wide`'s tail ahead of `narrow`'s (p99
  # ratios 1.67x and 1.43x) while their medians say 1.25x and 2x.
  from rtjax.optimize import search
  ctx = search.Context(Settings(**TINY), tmp_path, tmp_path,
                       SearchStore(tmp_path), fake_clock())
  ctx.meta = {"train": {"num_steps": 100}}
  screen = {"parent": {"p50_ms": 1.0, "p_ms": 2.0},
            "wide": {"p50_ms": 0.8, "p_ms": 1.2, "untuned_val_accuracy": 0.9},
            "narrow": {"p50_ms": 0.5, "p_ms": 1.4,
                       "untuned_val_accuracy": 0.8}}
  recipes = [{"name": "wide", "kind": "prune"},
             {"name": "narrow", "kind": "prune"}]
  plan = search._plan(ctx, {"budget_ms": 0.95, "parent_p_ms": 2.0}, recipes,
                      screen)
  assert plan["under_budget"] == set()  # over by the tail (1.2, 1.4 ms)
  assert plan["trainees"] == ["narrow", "wide"]  # and by the medians
  assert plan["steady"] == {"parent": pytest.approx(2.0),
                            "wide": pytest.approx(1.6),
                            "narrow": pytest.approx(1.0)}
  # At 1.0 ms `narrow` fits by its median ratio alone: it ranks by accuracy
  # with those that fit.
  plan = search._plan(ctx, {"budget_ms": 1.0, "parent_p_ms": 2.0}, recipes,
                      screen)
  assert plan["under_budget"] == {"narrow"}
  # A tail burst (3.0 ms, over budget x slack) does not screen out a
  # candidate whose median ratio fits.
  screen["narrow"]["p_ms"] = 3.0
  plan = search._plan(ctx, {"budget_ms": 1.0, "parent_p_ms": 2.0}, recipes,
                      screen)
  assert "narrow" in plan["trainees"] and "narrow" in plan["under_budget"]
  # Both fit at 2.0 ms; narrow's less favourable figure (1.4 ms against
  # wide's 1.6) leaves the wider margin: it goes first, though less accurate.
  screen["narrow"]["p_ms"] = 1.4
  plan = search._plan(ctx, {"budget_ms": 2.0, "parent_p_ms": 2.0}, recipes,
                      screen)
  assert plan["widest"] == "narrow" and plan["trainees"] == ["narrow", "wide"]


# ---- successive halving with a fake clock ------------------------------------

ACCURACY = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}


class Trainer:
  """A fake rung: accuracy by name (or by (name, rung) in `scripted`),
  `steps` seconds on the fake clock; can be told to die (as a SIGKILL
  would) at its n-th call."""

  def __init__(self, die_at=None, scripted=None, per_job=0.0):
    self.now, self.calls, self.die_at = 0.0, [], die_at
    self.scripted, self.per_job = scripted or {}, per_job

  def clock(self):
    return self.now

  def __call__(self, name, rung, steps):
    if self.die_at is not None and len(self.calls) == self.die_at:
      raise KeyboardInterrupt("killed")
    self.calls.append((name, rung))
    self.now += self.per_job + steps
    if (name, rung) in self.scripted:
      return {"val_accuracy": self.scripted[name, rung]}
    return {"val_accuracy": ACCURACY[name] + rung / 100}


def test_halving_resumes_without_redoing_and_decides_the_same(tmp_path):
  run = lambda directory, trainer: halving.successive_halving(
      "abcd", (1, 2, 4), trainer, SearchStore(directory), trainer.clock,
      budget_s=1e6, eta=2, max_finalists=1, extra_rungs=0)
  reference = Trainer()
  expected = run(tmp_path / "whole", reference)
  assert expected == {"a": 2}  # 4 -> 2 -> 1 survivor at the last rung
  assert reference.calls == [("a", 0), ("b", 0), ("c", 0), ("d", 0),
                             ("a", 1), ("b", 1), ("a", 2)]
  killed = Trainer(die_at=5)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path / "resumed", killed)
  resumed = Trainer()
  assert run(tmp_path / "resumed", resumed) == expected
  assert resumed.calls == reference.calls[5:]  # nothing finished is redone
  again = Trainer()
  assert run(tmp_path / "resumed", again) == expected and not again.calls


def test_halving_spends_time_left_on_longer_finalist_rungs(tmp_path):
  trainer = Trainer()
  store = SearchStore(tmp_path)
  finalists = halving.successive_halving(
      "abcd", (1, 2), trainer, store, trainer.clock, budget_s=1e6, eta=2,
      max_finalists=2, extra_rungs=2)
  assert trainer.calls[4:] == [("a", 1), ("b", 1), ("a", 2), ("b", 2),
                               ("a", 3), ("b", 3)]
  assert store.get("rung3")["steps"] == 8 and finalists == {"a": 3, "b": 3}


def test_a_lone_survivor_trains_through_every_rung(tmp_path):
  trainer = Trainer()
  finalists = halving.successive_halving(
      "ab", (1, 2, 4), trainer, SearchStore(tmp_path), trainer.clock,
      budget_s=1e6, eta=2, max_finalists=1, extra_rungs=1)
  assert trainer.calls == [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("a", 3)]
  assert finalists == {"a": 3}


def test_candidates_predicted_to_fit_rank_first(tmp_path):
  trainer = Trainer()
  finalists = halving.successive_halving(
      "abcd", (1, 2), trainer, SearchStore(tmp_path), trainer.clock,
      budget_s=1e6, eta=2, max_finalists=1, extra_rungs=0, fits="d")
  # d is the least accurate but the only one predicted to meet the budget.
  assert trainer.calls[4:] == [("d", 1), ("a", 1)] and finalists == {"d": 1}


def test_candidates_over_budget_rank_by_predicted_latency(tmp_path):
  trainer = Trainer()
  finalists = halving.successive_halving(
      "abcd", (1, 2), trainer, SearchStore(tmp_path), trainer.clock,
      budget_s=1e6, eta=2, max_finalists=1, extra_rungs=0,
      predicted={"a": 3.0, "b": 2.0, "c": 1.0, "d": 4.0})
  # None predicted to fit: the closest to the budget go on, not the most
  # accurate (a, then b).
  assert trainer.calls[4:] == [("c", 1), ("b", 1)] and finalists == {"c": 1}


def test_the_widest_margin_keeps_a_place_to_the_end(tmp_path):
  # d is the least accurate at every rung: ranked by accuracy alone it is
  # dropped at the first; reserved, it is a finalist beside the best.
  trainer = Trainer()
  store = SearchStore(tmp_path)
  finalists = halving.successive_halving(
      "abcd", (1, 2, 4), trainer, store, trainer.clock, budget_s=1e6, eta=2,
      max_finalists=2, extra_rungs=0, fits="abcd", reserved="d")
  assert finalists == {"d": 2, "a": 2}
  assert all(store.get(f"rung{k}")["reserved"] for k in range(3))
  # With a single finalist there is no place to spare: accuracy decides.
  trainer = Trainer()
  assert halving.successive_halving(
      "abcd", (1, 2, 4), trainer, SearchStore(tmp_path / "one"),
      trainer.clock, budget_s=1e6, eta=2, max_finalists=1, extra_rungs=0,
      fits="abcd", reserved="d") == {"a": 2}


def test_halving_keeps_as_many_as_the_finalists(tmp_path):
  trainer = Trainer()
  finalists = halving.successive_halving(
      "abcd", (1, 2, 4), trainer, SearchStore(tmp_path), trainer.clock,
      budget_s=1e6, eta=2, max_finalists=3, extra_rungs=0)
  assert finalists == {"a": 2, "b": 2, "c": 2}  # 4 -> 3 -> 3, not 4 -> 2 -> 1


@pytest.mark.parametrize("last, kept", [(0.93, 1), (0.95, 2)])
def test_a_finalist_is_its_best_rung_ties_to_the_later(tmp_path, last, kept):
  # a loses accuracy over its last rung (each rung restarts the schedule):
  # its best rung is kept, not its last; on a tie the later (longer) one.
  trainer = Trainer(scripted={("a", 0): 0.90, ("a", 1): 0.95, ("a", 2): last})
  finalists = halving.successive_halving(
      "ab", (1, 2, 4), trainer, SearchStore(tmp_path), trainer.clock,
      budget_s=1e6, eta=2, max_finalists=1, extra_rungs=0)
  assert trainer.calls[-1] == ("a", 2) and finalists == {"a": kept}


def test_a_slow_starting_student_is_not_dropped_at_the_first_rung(tmp_path):
  # p starts from trained weights, s from scratch: s trails after the first
  # rung (10 of the 50 steps it must train before it is judged), then
  # catches up. Without the protection halving would keep p alone.
  curves = {("p", 0): 0.90, ("p", 1): 0.92, ("p", 2): 0.93,
            ("s", 0): 0.50, ("s", 1): 0.94, ("s", 2): 0.96}
  trainer = Trainer(scripted=curves)
  store = SearchStore(tmp_path)
  finalists = halving.successive_halving(
      "ps", (10, 40, 90), trainer, store, trainer.clock, budget_s=1e6, eta=2,
      max_finalists=1, extra_rungs=0, scratch="s", scratch_min_steps=50)
  assert store.get("rung0")["protected"] == ["s"]
  assert trainer.calls == [("p", 0), ("s", 0), ("p", 1), ("s", 1), ("s", 2)]
  assert finalists == {"s": 2}


def test_the_last_extra_rung_is_cut_to_the_time_left(tmp_path):
  trainer = Trainer()
  store = SearchStore(tmp_path)
  finalists = halving.successive_halving(
      "abcd", (1, 2), trainer, store, trainer.clock, budget_s=11, eta=2,
      max_finalists=1, extra_rungs=3)
  # Rungs 0 and 1 take 8 s; the 4-step extra rung is cut to the 3 s left.
  assert trainer.calls[-1] == ("a", 2)
  assert store.get("job/a/rung2")["steps"] == 3
  assert halving.spent_seconds(store) == 11 and finalists == {"a": 2}


def test_a_jobs_fixed_cost_is_not_charged_per_step(tmp_path):
  # Each job costs 10 s plus 1 s a step. After rungs of 10 and 30 steps
  # (20 s and 40 s; 120 s for both candidates) the 90-step rung is 100 s:
  # it fits in the 100 s left. Seconds per step of the jobs so far (2 and
  # 1.33) would have put it at 150 s and cut it to 60 steps.
  trainer = Trainer(per_job=10.0)
  store = SearchStore(tmp_path)
  halving.successive_halving(
      "ab", (10, 30, 90), trainer, store, trainer.clock, budget_s=220,
      eta=2, max_finalists=2, extra_rungs=0)
  assert store.get("job/a/rung2")["steps"] == 90
  assert halving.spent_seconds(store) == 220


def test_halving_stops_at_the_time_limit(tmp_path):
  trainer = Trainer()
  store = SearchStore(tmp_path)
  finalists = halving.successive_halving(
      "abcd", (10, 20, 40), trainer, store, trainer.clock, budget_s=70,
      eta=2, max_finalists=3, extra_rungs=2)
  # Rung 0 costs 40 s; rung 1 (20 s per job) fits once more: 60 s, and a
  # second rung-1 job would end at 80 s > 70 s.
  assert trainer.calls[4:] == [("a", 1)]
  assert store.get("rung1")["out_of_time"]
  assert finalists == {"a": 1}
  assert halving.spent_seconds(store) == 60


# ---- a tiny search end to end --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_search(trained, tmp_path_factory):
  """The search killed inside its second rung-0 job, resumed, then rerun
  on the finished workdir: (workdir, summary, trained jobs per run, memo
  keys of the models compiled per run)."""
  return built_once(tmp_path_factory, "tiny_search", lambda: _tiny_search(
      trained, tmp_path_factory.mktemp("optimize")))


def _tiny_search(trained, workdir):
  original, original_compile = finetune.train_rung, serving.compile_with
  calls, compiled = [], []

  def compile_with(model, spec, batch, options):
    compiled[-1].append(memo.CompileMemo().key(model, spec, batch, options))
    return original_compile(model, spec, batch, options)

  def counted(limit):
    def train_rung(*args, **kwargs):
      stage_dir = args[7]
      if len(calls[-1]) == limit:
        raise KeyboardInterrupt("killed")
      calls[-1].append(f"{stage_dir.parent.name}/{stage_dir.name}")
      return original(*args, **kwargs)
    return train_rung

  summaries = []
  for limit in (1, None, None):
    calls.append([])
    compiled.append([])
    finetune.train_rung = counted(limit)
    serving.compile_with = compile_with
    try:
      summaries.append(run_search(trained[1], workdir, Settings(**TINY),
                                  clock=fake_clock()))
    except KeyboardInterrupt:
      summaries.append(None)
    finally:
      finetune.train_rung = original
      serving.compile_with = original_compile
  return workdir, summaries, calls, compiled


@pytest.mark.slow
def test_tiny_search_end_to_end(tiny_search):
  from rtjax.checkpoint import load_checkpoint
  from rtjax.infer import CompiledModel
  from rtjax.infer.options import device_kind
  workdir, summaries, _, _ = tiny_search
  summary = summaries[1]
  names = [c["name"] for c in summary["candidates"]]
  assert names == ["uniform50", "uniform25"]
  for name in names:  # each candidate rung is a stage with its lineage
    _, meta = load_checkpoint(workdir / "candidates" / name / "rung0")
    assert meta["stage_type"] == "optimize_candidate"
    assert meta["parent"] == str(summary["parent"])
    assert meta["done"]["recipe"]["name"] == name
  assert set(summary["final"]) >= {"parent", summary["chosen"]}
  for name, row in summary["final"].items():
    low, high = row["test"]["ci95"]
    assert low <= row["test"]["accuracy"] <= high
  for path in ("optimize.md", "optimize.json", "optimize.png",
               "sensitivity.png"):
    assert (workdir / path).exists(), path
  text = (workdir / "optimize.md").read_text()
  for heading in ("## Sensitivity", "## Candidates", "## Finalists",
                  "## Audit", "## Time: ", "**Chosen: "):
    assert heading in text
  chosen = summary["final"][summary["chosen"]]
  _, best = load_checkpoint(workdir / "best")
  assert best["serving"][device_kind()] == chosen["options"]
  assert best["done"]["candidate"] == summary["chosen"]
  served = CompiledModel.from_checkpoint(workdir / "best", batch_sizes=[8])
  assert {k: served.options[k] for k in chosen["options"]} == chosen["options"]
  assert {served.options["source"][k] for k in chosen["options"]} == {
      "checkpoint"}  # every option the search chose comes from the record
  assert json.loads((workdir / "optimize.json").read_text())["chosen"] == \
      summary["chosen"]
  time = summary["time"]  # every recorded second is in one part
  assert sum(s for _, s in time["parts"]) == pytest.approx(
      summary["spent_seconds"])
  store = SearchStore(workdir)  # a finalist keeps what screening chose
  screen = store.get("screen")
  for name in names:
    for trial in store.get(f"options/{name}")["trials"]:
      assert {k: trial["options"][k] for k in SCREENED_OPTIONS} == {
          k: screen[name][k] for k in SCREENED_OPTIONS}


@pytest.mark.slow
def test_killed_search_resumes_without_redoing_finished_candidates(
    tiny_search):
  workdir, summaries, calls, _ = tiny_search
  assert summaries[0] is None and len(calls[0]) == 1  # killed in the 2nd
  [first] = calls[0]
  assert first not in calls[1]  # kept, not retrained
  assert calls[1] and calls[1][0] != first and calls[1][0].endswith("rung0")
  assert calls[2] == []  # the rerun trains nothing ...
  assert summaries[2]["chosen"] == summaries[1]["chosen"]  # ... and agrees
  assert summaries[2]["final"] == summaries[1]["final"]


@pytest.mark.slow
def test_a_search_compiles_each_model_once(tiny_search):
  """The option grid, the sensitivity, screening's parent and the final
  runs share one memo: no (structure, weights, batch, options) is compiled
  twice in a run, and the report counts what was."""
  _, summaries, _, compiled = tiny_search
  killed, resumed, _ = compiled
  assert killed and resumed  # parent phases; the finalists and final runs
  for keys in compiled:
    assert len(set(keys)) == len(keys)
  counted = summaries[1]["compile_memo"]
  assert counted["keys"] == counted["compiles"] == len(resumed)
  assert counted["most_compiles_of_one_key"] == 1
  assert counted["reused"] >= 1 and counted["compile_seconds"] > 0
  assert "at most 1 time(s) each" in summaries[1]["markdown"]


# ---- the audit -------------------------------------------------------------

def test_audit_flags_a_candidate_built_to_be_slower(trained):
  """The parent padded with zero units to 4x its widths: the same function
  at several times the FLOPs, measured in one interleaved run."""
  from rtjax.bench.breakdown import measure_peaks
  from rtjax.checkpoint import load_checkpoint
  from rtjax.compress.structured import widen
  from rtjax.optimize import screening, serving
  model, meta = load_checkpoint(trained[1])
  wide, args = widen(model, meta["model"]["name"], meta["model"]["args"], 64)
  spec = {"name": meta["model"]["name"], "args": args}
  options = {"conv_lowering": "xla", "embed_weights": False,
             "dtype": "float32", "round_widths_to": 0}
  served = [serving.compile_with(m, s, 64, options)
            for m, s in ((model, meta["model"]), (wide, spec))]
  latency = serving.interleaved(served, 64, 90, seconds=1.0)
  peaks = measure_peaks(256, 8, 1)
  rows = [screening.cost_row(n, m, s, c, lat, peaks, 64) for n, m, s, c, lat
          in zip(("parent", "wide"), (model, wide), (meta["model"], spec),
                 served, latency)]
  result = audit.audit(rows[1], rows[0], floor_ms=0.0)
  assert result["predicted_flops"] < 0.5
  assert not result["paid"]
  assert any("FLOPs" in r for r in result["reasons"])
  assert audit.audit(rows[0], rows[0], 0.0)["measured_p50"] == 1.0


def test_audit_names_the_padding_that_ate_fewer_flops_on_a_slice():
  parent = {"flops": 1e6, "t_predicted_s": 1e-6, "p50_ms": 0.0010,
            "p_ms": 0.0010, "padding": {"data_share": 0.5,
                                        "most_padded": "conv1 f32[8, 48]"}}
  narrower = {**parent, "flops": 0.7e6, "p50_ms": 0.00099, "p_ms": 0.00099,
              "padding": {"data_share": 0.375,
                          "most_padded": "conv1 f32[8, 36]: 28%"}}
  result = audit.audit(narrower, parent, floor_ms=0.0)
  assert not result["paid"]
  [reason] = [r for r in result["reasons"] if "padding" in r]
  assert "1.43x fewer FLOPs" in reason and "conv1 f32[8, 36]" in reason
  assert "38%" in reason and "50%" in reason
  slightly = {**narrower, "flops": 0.9e6}  # 10% fewer: not padding's doing
  assert not any("padding" in r for r in audit.audit(
      slightly, parent, 0.0)["reasons"])


def test_audit_names_int8_run_as_int32_and_dispatch_bound():
  hlo = ("%p = s8[3,3,4,4]{3,2,1,0} parameter(0)\n"
         "%c = s32[1,8,8,4]{3,2,1,0} convolution(%convert_fusion, "
         "%wrapped_convert), window={size=3x3}\n")
  assert audit.int8_lowering(hlo) == "int32"
  assert audit.int8_lowering(hlo.replace("s8[", "f32[")) is None
  parent = {"flops": 1e6, "t_predicted_s": 1e-5, "p50_ms": 0.10,
            "p_ms": 0.2, "gflops_per_s": 10.0}
  int8 = {**parent, "flops": 0.9e6, "p50_ms": 0.2, "int8_lowering": "int32"}
  result = audit.audit(int8, parent, floor_ms=0.15)
  assert not result["paid"]
  assert "int32" in result["reasons"][0]
  assert any("dispatch overhead dominates" in r for r in result["reasons"])


# ---- the command line ----------------------------------------------------------

@pytest.mark.slow
def test_impossible_budget_exits_1_naming_the_closest(trained, tmp_path):
  result = run_module(
      "experiments.optimize", f"--checkpoint={trained[1]}",
      f"--workdir={tmp_path}", "--budget_of_parent=0.01", "--batch_size=8",
      "--keep_fractions=0.5", "--sensitivity_groups=stream1",
      "--uniform=0.25", "--thresholds=",
      "--noshallow", "--noint8", "--noauto_lowering", "--measure_seconds=0.2",
      "--final_seconds=0.4")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  [line] = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert "no candidate meets the" in line
  # The closest is whichever screening measured fastest: at batch 8 the
  # parent and uniform25 both run close to the per-call floor.
  screen = json.loads((tmp_path / "search_state.json").read_text())["screen"]
  fastest = min(screen, key=lambda n: screen[n]["p_ms"])
  assert f"the fastest architecture, {fastest}, measured" in line
  assert "x over budget" in line and "Host overhead" in line


# ---- the pipeline stage type ------------------------------------------------------

@pytest.mark.slow
def test_optimize_stage_ends_a_pipeline(trained, tiny_search, tmp_path):
  """A config whose last stage is `optimize`: registered by importing
  rtjax.optimize (as such a config does), validated, run by run_pipeline
  into <workdir>/<stage>/checkpoints, then skipped when rerun. The teacher
  and the search's measurements are copies of the runs above, so only the
  wiring runs here."""
  import rtjax.optimize  # noqa: F401  (registers the stage type)
  from configs import default
  from rtjax.checkpoint import load_checkpoint
  from rtjax.errors import ConfigError
  from rtjax.pipeline import run_pipeline, stage_config, validate
  config = default.get_config("tiny")
  config.stages = ("teacher", "optimize")
  config.stage.teacher = stage_config("train")
  config.stage.optimize = stage_config("optimize", **TINY)
  validate(config)
  bad = config.copy_and_resolve_references()
  bad.stage.optimize.budget_of_parent = 0.5  # and latency_budget_ms: both
  with pytest.raises(ConfigError, match="exactly one of"):
    validate(bad)
  workdir = tmp_path / "run"
  import shutil
  shutil.copytree(trained[1], workdir / "teacher")
  shutil.copytree(tiny_search[0], workdir / "optimize")
  shutil.rmtree(workdir / "optimize" / "best")
  results = run_pipeline(config, workdir)
  _, meta = load_checkpoint(workdir / "optimize")
  assert meta["stage"] == "best" and meta["complete"]
  assert meta["done"]["candidate"] == tiny_search[1][1]["chosen"]
  assert (workdir / "optimize" / "report.json").exists()
  assert results["optimize"].checkpoint_dir == workdir / "optimize" / \
      "checkpoints"
  again = run_pipeline(config, workdir)  # finished: skipped
  assert again["optimize"].step == results["optimize"].step


def test_layer_dropping_candidates_from_the_sensitivity():
  from rtjax.models.registry import full_args, model_class
  spec = {"name": "vit", "args": full_args(model_class("vit"), {
      "num_classes": 10, "input_shape": [8, 8, 1], "depth": 4})}
  blocks = [{"name": f"block {i}", "index": i, "accuracy_drop": d}
            for i, d in enumerate([9.0, 1.0, 3.0, 2.0])]
  made = {r["name"]: r["drop"] for r in candidates.recipes(
      spec, {"groups": [], "int8": [], "blocks": blocks}, uniform=(),
      thresholds=(), shallow=False)}
  # The cheapest first; DistilBERT's every other block; the last half.
  assert made == {"drop1": [1], "drop2": [1, 3], "drop3": [1, 2, 3],
                  "drop_last2": [2, 3]}  # every other block is drop2's


def test_recipes_that_round_to_the_same_widths_are_trained_once():
  # 4 units: 37.5% rounds up to 50%'s two units; 100% keeps every unit.
  spec = {"name": "mlp", "args": {"num_classes": 10, "input_shape": [40],
                                  "hidden": [4], "residual": False}}
  made = candidates.recipes(spec, {"groups": [], "int8": [], "blocks": []},
                            (1.0, 0.75, 0.5, 0.375, 0.25), (), shallow=False)
  assert [r["name"] for r in made] == ["uniform75", "uniform50", "uniform25"]


def test_screening_predicts_from_the_percentile_ratio():
  # A small model whose tail sits closer to its median than the parent's:
  # half the parent's p99, though 0.6 of its p50.
  rows = {"parent": {"p50_ms": 1.0, "p_ms": 2.0},
          "small": {"p50_ms": 0.6, "p_ms": 1.0}}
  assert screening.screened_p(rows, "small") == pytest.approx(1.0)
  # Scaled to the parent's latency the budget was set from.
  assert screening.screened_p(rows, "small", parent_p_ms=3.0) == pytest.approx(1.5)


def test_screening_tries_the_parents_own_lowering_where_the_layers_exist():
  from rtjax.models.registry import create_model, full_args, model_class
  args = full_args(model_class("cnn1d"), {"num_classes": 10,
                                          "input_shape": [40, 1]})
  spec = {"name": "cnn1d", "args": args}
  model = create_model("cnn1d", args)
  patches = "conv1:patches,conv2:patches,conv3:patches"
  # A mixed choice is a third variant; a uniform one adds nothing; a layer
  # the candidate lacks (here a made-up one) is left out.
  assert serving.conv_lowerings(model, spec, "conv1:patches") == [
      "xla", patches, "conv1:patches"]
  assert serving.conv_lowerings(model, spec, "xla") == ["xla", patches]
  assert serving.conv_lowerings(model, spec, "conv1:patches,deep/conv9:patches"
                              ) == ["xla", patches, "conv1:patches"]
  # A finalist's option grid keeps the lowering screening chose for it.
  grid = serving.option_grid(model, spec, {"conv_lowering": "conv1:patches"})
  assert grid and {o["conv_lowering"] for o in grid} == {"conv1:patches"}
