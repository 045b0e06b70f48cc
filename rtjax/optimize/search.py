"""The budget-driven search: from a checkpoint and a latency budget on this
device to the most accurate model that meets it, with the evidence.

Reads top to bottom: the phases in order (serve the parent at its best,
sensitivity, candidate recipes, screening of their architectures, the plan
of whom to train, successive halving, int8 variants, the finalists in
interleaved runs and on the test split, the choice); then the outputs. The
settings are rtjax.optimize.settings'. Every phase's result is recorded in
the workdir's store (rtjax.optimize.store) and every candidate rung is a
checkpointed stage, so a killed search resumes where it stopped. Every
model is compiled once per search (rtjax.optimize.memo).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

import numpy as np
from absl import logging
from etils import epath

from rtjax import accelerators, compare
from rtjax.bench import breakdown, latency
from rtjax.checkpoint import (checkpoint_dataset, finished_stage,
                              load_checkpoint, save_complete_step)
from rtjax.compress import quantize
from rtjax.errors import UserError
from rtjax.optimize import (candidates, checkpoints, decide, drift, finetune,
                            halving, report, screening, sensitivity, serving,
                            stats)
from rtjax.optimize.memo import CompileMemo
from rtjax.optimize.settings import Settings
from rtjax.optimize.store import SearchStore
from rtjax.target import Target, resolve
from rtjax.target.predict import peaks as target_peaks
from rtjax.train import read_metrics
from rtjax.train.evaluate import evaluate


# The serving options screening times for every architecture (its cost rows
# record the fastest's); a finalist's option search keeps them.
SCREENED_OPTIONS = ("conv_lowering", "embed_weights", "dot_kernels")


class BudgetNotMet(UserError):
  """No candidate meets the budget (or the accuracy limit); the message
  names the closest one and what would be needed. Exit code 1."""


@dataclasses.dataclass
class Context:
  """What the phases share."""
  settings: Settings
  parent_dir: epath.Path
  workdir: epath.Path
  store: SearchStore
  clock: Callable[[], float]
  parent: object = None
  meta: dict = None
  dataset: object = None
  rivals: dict = dataclasses.field(default_factory=dict)  # name -> path
  memo: CompileMemo = dataclasses.field(default_factory=CompileMemo)
  target: Target | None = None  # a slice that is not attached

  # Interleaved runs of compiled models (serving.repeated's signature); the
  # final and rival phases time through it.
  timer: Callable[..., list[dict]] = serving.repeated

  @property
  def spec(self) -> dict:
    return self.meta["model"]

  @property
  def batch(self) -> int:
    return self.settings.batch_size

  @property
  def kind(self) -> str | None:
    """The kind of device serving options are chosen for (None: this
    host's)."""
    return "tpu" if self.target else None

  @property
  def auto_lowering(self) -> bool:
    """Banded conv lowerings are timed on the attached device."""
    return self.settings.auto_lowering and not self.target

  @property
  def int8(self) -> bool:
    """int8 is tried on a slice whose published int8 rate exceeds its bf16
    rate (v5e, v6e), on this host when asked."""
    generation = self.target.generation if self.target else None
    return self.settings.int8 and (not generation or (
        generation.int8_ops_per_s or 0) > generation.bf16_flops_per_s)

  def phase(self, name: str, compute: Callable[[], object]):
    """A phase's recorded result, or run it, recording result and seconds."""
    if name in self.store:
      return self.store.get(name)
    start = self.clock()
    value = compute()
    self.store.put("phase_seconds", {**self.store.get("phase_seconds", {}),
                                     name: self.clock() - start})
    self.store.put(name, value)
    return value


def run_search(checkpoint: epath.PathLike, workdir: epath.PathLike,
               settings: Settings, best_dir: epath.PathLike | None = None,
               clock: Callable[[], float] = time.monotonic) -> dict:
  """The whole search; returns the summary written to optimize.json.
  Raises BudgetNotMet (after writing the report) when nothing qualifies."""
  settings.check()
  ctx = _context(checkpoint, workdir, settings, clock)
  parent_options = ctx.phase("parent_options", lambda: serving.choose_options(
      ctx.parent, ctx.spec, ctx.batch, settings.percentile,
      ctx.dataset.val.images, settings.measure_seconds, ctx.auto_lowering,
      ctx.memo.compile, kind=ctx.kind))
  budget = ctx.phase("budget", lambda: _budget(ctx, parent_options))
  sens = ctx.phase("sensitivity", lambda: sensitivity.measure(
      ctx.parent, ctx.spec, ctx.dataset.val, ctx.batch, settings.percentile,
      parent_options["options"], settings.keep_fractions, ctx.int8,
      settings.measure_seconds, settings.sensitivity_groups,
      ctx.memo.compile, settings.layer_drop))
  recipes = ctx.phase("recipes", lambda: candidates.recipes(
      ctx.spec, sens, settings.uniform, settings.thresholds,
      settings.shallow, accelerators.TILES["float32"][1] if ctx.target
      else None))
  peaks = ctx.phase("peaks", lambda: target_peaks(ctx.target, "float32")
                    if ctx.target else breakdown.measure_peaks(1024, 64, 3))
  # A slice's estimate is the device's time alone: no host call to floor it.
  ctx.phase("floor_ms", lambda: 0.0 if ctx.target
            else latency.call_floor_ms(ctx.batch))
  screen = ctx.phase("screen", lambda: screening.screen(
      ctx.parent, ctx.spec, recipes, ctx.batch, settings.percentile,
      parent_options["options"], peaks, ctx.dataset.val,
      settings.measure_seconds, settings.final_runs,
      settings.final_seconds, ctx.memo.compile, ctx.kind))
  plan = _plan(ctx, budget, recipes, screen)
  recipe_of = {r["name"]: r for r in recipes}
  reserve = ctx.phase("reserve_seconds", lambda: _reserve_seconds(
      ctx, len(plan["trainees"])))
  finalists = halving.successive_halving(
      plan["trainees"], plan["rungs"], lambda name, k, steps: _train(
          ctx, recipe_of[name], k, steps), ctx.store, clock,
      60 * settings.search_minutes - reserve,
      eta=settings.halving_eta, max_finalists=settings.max_finalists,
      extra_rungs=settings.extra_rungs, fits=plan["under_budget"],
      predicted=plan["steady"], scratch=plan["scratch"],
      reserved=plan["widest"],
      scratch_min_steps=int(settings.scratch_min_fraction
                            * ctx.meta["train"]["num_steps"]))
  paths = {n: str(_rung_dir(ctx, n, k)) for n, k in finalists.items()}
  paths.update(_int8_variants(ctx, sens, paths))
  if plan["parent_fits"]:
    paths["parent"] = str(ctx.parent_dir)
  final = _final(ctx, paths, parent_options, "final_latency",
                 ("screening", screen["parent"]))
  if settings.budget_of_parent:  # relative to the parent in the same run
    budget = {**budget, "preliminary_ms": budget["budget_ms"],
              **settings.budget(final["parent"]["p_ms"], "" if ctx.target
                                else " in the final interleaved runs")}
  return _conclude(ctx, plan, final, budget, paths, parent_options,
                   epath.Path(best_dir) if best_dir else ctx.workdir / "best")


# ---- phases ---------------------------------------------------------------

def _context(checkpoint: epath.PathLike, workdir: epath.PathLike,
             settings: Settings, clock: Callable[[], float]) -> Context:
  """The parent loaded (a float checkpoint), its dataset and the rivals."""
  workdir = epath.Path(workdir)
  ctx = Context(settings, epath.Path(checkpoint), workdir,
                SearchStore(workdir), clock)
  searched_for = ctx.phase("target", lambda: settings.target)
  if searched_for != settings.target:  # its figures are another device's
    raise UserError(
        f"{workdir} holds a search for {searched_for or 'this host'}, not "
        f"{settings.target or 'this host'}: give a new --workdir")
  if settings.target:
    ctx.target = resolve(settings.target)
    ctx.memo = CompileMemo(target=ctx.target)
  ctx.parent, ctx.meta = load_checkpoint(ctx.parent_dir)
  if ctx.meta["model"].get("quantization"):
    raise UserError(f"{checkpoint} is a quantized checkpoint; give its float "
                    "parent (the search adds int8 where it pays)")
  ctx.dataset = checkpoint_dataset(ctx.meta)
  ctx.rivals = {f"rival:{path.name}": str(path) for run in settings.rivals
                for path in compare.stage_checkpoints(run)}
  return ctx


def _budget(ctx: Context, parent_options: dict) -> dict:
  """The budget in ms; a fraction of the parent's measured latency (served
  with its best options, alone) when budget_of_parent is set."""
  s = ctx.settings
  if s.latency_budget_ms:
    return s.budget(None, "")
  served = ctx.memo.compile(ctx.parent, ctx.spec, ctx.batch,
                            parent_options["options"])
  [row] = serving.interleaved([served], ctx.batch, s.percentile,
                              s.final_seconds / 2)
  return s.budget(row["p_ms"], "")


def _plan(ctx: Context, budget: dict, recipes: list[dict],
          screen: dict) -> dict:
  """Whom to train, from screening: the architectures predicted within
  screen_slack of the budget, in the order halving ranks them (those
  predicted to meet the budget by their tail or their median ratio to the
  parent's first, by accuracy before fine-tuning; then the others, closest
  to the budget by screening.steady_p first: a student trained from
  scratch has no accuracy yet to rank by); the one predicted to fit with
  the widest margin first of all, as halving reserves it a place. Raises
  BudgetNotMet when none is."""
  s = ctx.settings
  budget_ms = budget["budget_ms"]
  parent_p = budget.get("parent_p_ms")
  predicted = {n: screening.screened_p(screen, n, parent_p) for n in screen}
  steady = {n: screening.steady_p(screen, n, parent_p) for n in screen}
  likely = {n: screening.likely_p(screen, n, parent_p) for n in screen}
  screened_in = [r["name"] for r in recipes
                 if likely[r["name"]] <= budget_ms * s.screen_slack]
  parent_fits = predicted["parent"] <= budget_ms * s.screen_slack
  if not screened_in and not parent_fits:
    rows = sorted(({**r, "p_ms": predicted[n]} for n, r in screen.items()),
                  key=lambda r: r["p_ms"])
    raise BudgetNotMet(_unmet(rows[0], budget_ms, ctx.store.get("floor_ms"),
                              ctx.batch, s.percentile, "architecture",
                              ctx.target))
  under_budget = {n for n in screened_in if likely[n] <= budget_ms}
  # The widest margin by the less favourable figure: halving keeps it.
  widest = min(under_budget, default=None, key=lambda n: max(
      predicted[n], steady[n]))
  order = halving.ranked(screened_in, {
      n: screen[n]["untuned_val_accuracy"] for n in screened_in
      if "untuned_val_accuracy" in screen[n]}, widest, under_budget, steady)
  return {"steady": steady, "parent_fits": parent_fits,
          "under_budget": under_budget, "widest": widest, "scratch": [
              r["name"] for r in recipes if candidates.from_scratch(r)],
          "trainees": order[:s.max_candidates],
          "rungs": s.rung_steps or _default_rungs(ctx.meta)}


def _conclude(ctx: Context, plan: dict, final: dict, budget: dict,
              paths: dict, parent_options: dict,
              best_dir: epath.Path) -> dict:
  """The choice, the rivals against it, the report; `best` written, or
  BudgetNotMet with what the closest finalist misses by."""
  s, store = ctx.settings, ctx.store
  budget_ms, floor = budget["budget_ms"], store.get("floor_ms")
  verdict = decide.verdicts(final, budget_ms, s.max_accuracy_drop,
                            plan["parent_fits"], s.reject_significant_loss)
  chosen = decide.choose(final, verdict)
  rivals = _rivals(ctx, chosen, paths, parent_options) if chosen else {}
  for row in final.values():
    row.pop("correct", None)
  unmet = None
  if chosen is None:
    if all(r["p_ms"] > budget_ms for r in final.values()):
      fastest = min(final.values(), key=lambda r: r["p_ms"])
      unmet = _unmet(fastest, budget_ms, floor, ctx.batch, s.percentile,
                     "finalist", ctx.target)
    else:
      unmet = decide.accuracy_unmet(final, budget_ms, s.max_accuracy_drop)
  sens = store.get("sensitivity")
  summary = report.summarize(
      s, budget, sens, store.get("recipes"), store.get("screen"),
      plan["trainees"], plan["rungs"], store, final, verdict, chosen, floor,
      unmet, str(ctx.parent_dir))
  summary.update(rivals=rivals, compile_memo=ctx.memo.summary(),
                 parent_drift=store.get("parent_drift", {}),
                 scratch=_scratch_rule(ctx, plan),
                 reserved=plan["widest"] if store.get("rung0", {}).get(
                     "reserved") else None)
  report.write(summary, ctx.workdir, sens)
  if chosen is None:
    raise BudgetNotMet(unmet)
  _write_best(ctx, final, chosen, budget, best_dir)
  return summary


def _scratch_rule(ctx: Context, plan: dict) -> dict | None:
  """How long students from scratch were protected from halving, beside
  the parent's own validation curve at that step (its run's metrics, when
  the checkpoint is a run's workdir): how far a model of the parent's
  recipe had come by then."""
  if not plan["scratch"]:
    return None
  total = int(ctx.meta["train"]["num_steps"])
  steps = int(ctx.settings.scratch_min_fraction * total)
  path = ctx.parent_dir / "metrics.jsonl"
  curve = [(r["step"], r["accuracy"]) for r in (
      read_metrics(ctx.parent_dir) if path.exists() else [])
           if r["split"] == "val"]
  reached = [a for step, a in curve if step <= steps]
  return {"students": plan["scratch"], "min_steps": steps,
          "parent_steps": total,
          "parent_val_then": reached[-1] if reached else None,
          "parent_val_end": curve[-1][1] if curve else None}


def _default_rungs(meta: dict) -> list[int]:
  base = max(20, int(meta["train"]["num_steps"]) // 20)
  return [base, 3 * base, 9 * base]


def _reserve_seconds(ctx: Context, trainees: int) -> float:
  """Time kept for the final phase: each finalist's (and int8 variant's)
  option search, scaled from the parent's by the option sets it times; the
  rivals' full option searches; the final interleaved runs, then as many
  again with the rivals."""
  s = ctx.settings
  parent_s = ctx.store.get("phase_seconds", {}).get("parent_options", 10.0)
  options = ctx.store.get("parent_options")["options"]
  share = len(serving.option_grid(ctx.parent, ctx.spec, {
      k: options[k] for k in SCREENED_OPTIONS})) / len(
          serving.option_grid(ctx.parent, ctx.spec))
  finalists = min(trainees, s.max_finalists) * (
      2 if _int8_layers(ctx, ctx.store.get("sensitivity")) else 1)
  return (finalists * max(share * parent_s, 2 * s.measure_seconds)
          + len(ctx.rivals) * parent_s + 2 * s.final_runs * s.final_seconds)


def _rung_dir(ctx: Context, name: str, k: int) -> epath.Path:
  return ctx.workdir / "candidates" / name / f"rung{k}"


def _train(ctx: Context, recipe: dict, k: int, steps: int) -> dict:
  stage_dir = _rung_dir(ctx, recipe["name"], k)
  meta = finished_stage(stage_dir)
  if meta is None:
    model, spec = candidates.build(recipe, ctx.parent, ctx.spec,
                                   seed=int(ctx.meta.get("seed") or 0))
    meta = finetune.train_rung(
        ctx.parent_dir, ctx.meta, ctx.parent, ctx.dataset, recipe, model,
        spec, stage_dir, _rung_dir(ctx, recipe["name"], k - 1) if k else None,
        steps, ctx.settings.fine_tune_lr)
  logging.info("candidate %s rung %d (%d steps): val accuracy %.4f",
               recipe["name"], k, steps, meta["metrics"]["val"]["accuracy"])
  return {"val_accuracy": meta["metrics"]["val"]["accuracy"],
          "path": str(stage_dir)}


def _int8_layers(ctx: Context, sens: dict) -> list[str]:
  return [e["name"] for e in sens["int8"]
          if e["speedup_p50"] >= ctx.settings.int8_min_speedup
          and e["accuracy_drop"] <= ctx.settings.int8_max_accuracy_drop]


def _int8_variants(ctx: Context, sens: dict, paths: dict) -> dict:
  """For each finalist, its int8 (PTQ) variant in the layers where int8
  alone measured faster at this batch and cost little accuracy (the
  settings' int8_min_speedup and int8_max_accuracy_drop)."""
  layers = _int8_layers(ctx, sens)
  if not layers:
    return {}
  module_path = "|".join(map(re.escape, layers))
  out = {}
  for name, path in paths.items():
    directory = ctx.workdir / "candidates" / f"{name}+int8"
    if finished_stage(directory) is None:
      model, meta = load_checkpoint(path)
      served, qspec = quantize.ptq(
          model, meta["model"]["args"]["input_shape"], "w8a8", module_path)
      metrics = {split: evaluate(served, getattr(ctx.dataset, split), 512)
                 for split in ("val", "test")}
      save_complete_step(served, checkpoints.int8_metadata(
          meta, served, qspec, stage=f"{name}+int8", parent=path,
          metrics=metrics), directory)
    out[f"{name}+int8"] = str(directory)
  return out


def _rivals(ctx: Context, chosen: str, paths: dict,
            parent_options: dict) -> dict:
  """Other checkpoints (a hand-written pipeline's stages) against the chosen
  model: measured with their own best options in interleaved runs with
  the parent and the chosen model, and tested on the same test examples."""
  if not ctx.rivals:
    return {}
  own = {chosen: paths.get(chosen, str(ctx.parent_dir))}
  final_parent = ctx.store.get("final_latency")["parent"]
  rows = _final(ctx, {**own, **ctx.rivals}, parent_options, "rivals_latency",
                ("the final runs", final_parent))
  budget_ms = ctx.settings.budget(rows["parent"]["p_ms"], "")["budget_ms"]
  out = {"budget_ms": budget_ms, "chosen": {
      k: rows[chosen][k] for k in ("p50_ms", "p_ms", "test")}, "rows": {}}
  for name in ctx.rivals:
    r = rows[name]
    out["rows"][name] = {
        "path": r["path"], "p50_ms": r["p50_ms"], "p_ms": r["p_ms"],
        "meets_budget": r["p_ms"] <= budget_ms, "test": r["test"],
        "vs_chosen": stats.compare_to_reference(rows[chosen]["correct"],
                                                r["correct"])}
  return out


def _served(ctx: Context, paths: dict, parent_options: dict
            ) -> tuple[dict, dict, dict]:
  """(loaded, options, compiled) per name, the parent first: each model
  with the serving options that measured fastest for it. A finalist keeps
  the conv lowering, weight embedding and dot kernels its architecture
  measured fastest with in screening (latency does not depend on the
  weights) and times the rest (dtype, padded widths, 'auto')."""
  s = ctx.settings
  names = ["parent"] + [n for n in paths if n != "parent"]
  loaded = {"parent": (ctx.parent, ctx.meta)}
  options = {"parent": parent_options}
  screened = ctx.store.get("screen", {})
  for name in names[1:]:
    model, meta = loaded[name] = load_checkpoint(paths[name])
    fixed = ({k: screened[name][k] for k in SCREENED_OPTIONS}
             if name in screened else None)
    options[name] = ctx.phase(f"options/{name}", lambda: serving.choose_options(
        model, meta["model"], ctx.batch, s.percentile, ctx.dataset.val.images,
        s.measure_seconds, ctx.auto_lowering and not name.startswith("rival:"),
        ctx.memo.compile, fixed, ctx.kind))
  compiled = {n: ctx.memo.compile(loaded[n][0], loaded[n][1]["model"],
                                  ctx.batch, options[n]["options"])
              for n in names}
  return loaded, options, compiled


def _steady_latency(ctx: Context, phase: str, compiled: dict,
                    reference: tuple[str, dict]) -> dict:
  """{name: latency} of the compiled models in interleaved runs, measured
  once more when the parent moved from the `reference` phase's (name, row)
  beyond the noise (rtjax.optimize.drift); what happened is recorded."""
  s, names = ctx.settings, list(compiled)
  latency, note = drift.steady(
      lambda: dict(zip(names, ctx.timer(
          [compiled[n] for n in names], ctx.batch, s.percentile,
          s.final_seconds, s.final_runs))), lambda rows: rows["parent"],
      reference[1])
  if note:
    ctx.store.put("parent_drift", {**ctx.store.get("parent_drift", {}),
                                   phase: drift.describe(
                                       phase, reference[0], note,
                                       s.percentile)})
  return latency


def _final(ctx: Context, paths: dict, parent_options: dict, phase: str,
           reference: tuple[str, dict]) -> dict:
  """The finalists and the parent, each with its best serving options,
  timed together (interleaved runs at the batch size, medians over runs);
  then the served models' predictions on the test split, paired with the
  parent's."""
  loaded, options, compiled = _served(ctx, paths, parent_options)
  latency = ctx.phase(phase, lambda: _steady_latency(ctx, phase, compiled,
                                                     reference))
  test = ctx.dataset.test
  correct = {n: np.argmax(compiled[n](test.images), -1) == test.labels
             for n in compiled}
  rows = {}
  for n, (model, meta) in loaded.items():
    row = screening.cost_row(n, model, meta["model"], compiled[n], latency[n],
                             ctx.store.get("peaks"), ctx.batch)
    row.update(p_ms_runs=latency[n]["p_ms_runs"],
               path=str(ctx.parent_dir) if n == "parent" else paths[n],
               options=options[n]["options"],
               val_accuracy=meta["metrics"]["val"]["accuracy"],
               test=stats.compare_to_reference(correct["parent"], correct[n]),
               correct=correct[n])
    rows[n] = row
  return rows


def _unmet(row: dict, budget_ms: float, floor_ms: float, batch: int,
           percentile: float, what: str, target: Target | None = None) -> str:
  """What the closest candidate misses by, and what would be needed."""
  over = row["p_ms"] / budget_ms
  share = floor_ms / row["p_ms"]
  figure, verb = ((f"XLA:TPU-estimated (on {target.name})", "is estimated at")
                  if target else (f"p{percentile:g}", "measured"))
  text = (f"no candidate meets the {budget_ms:.4g} ms {figure} budget "
          f"at batch {batch}: the fastest {what}, {row['name']}, {verb} "
          f"{row['p_ms']:.4g} ms, {over:.2f}x over budget; it would need a "
          f"further {over:.2f}x speedup")
  if target:
    return text
  text += (f". Host overhead (a trivial jitted call, {floor_ms:.4g} ms) is "
           f"{100 * share:.0f}% of it")
  if floor_ms >= budget_ms:
    text += ("; the budget is below that floor, so no model meets it on "
             "this device")
  return text


def _write_best(ctx: Context, final: dict, chosen: str, budget: dict,
                best_dir: epath.Path) -> None:
  """`best` (the chosen model) and `<workdir>/parent` (the parent as it was
  measured), each with the serving options it was measured with, so that
  experiments.bench on the two compares them as the search did."""
  s = ctx.settings
  for name, directory, stage in ((chosen, best_dir, "best"),
                                 ("parent", ctx.workdir / "parent", "parent")):
    written = finished_stage(directory)
    if written is not None and written["done"].get("candidate") == name:
      continue  # a resumed search that chose the same
    if (directory / "checkpoints").exists():  # another choice before: replace
      (directory / "checkpoints").rmtree()
    row = final[name]
    model, meta = ((ctx.parent, ctx.meta) if name == "parent"
                   else load_checkpoint(row["path"]))
    measured = {"batch_size": ctx.batch, "percentile": s.percentile,
                "p_ms": row["p_ms"], "p50_ms": row["p50_ms"],
                "budget_ms": budget["budget_ms"]}
    save_complete_step(model, checkpoints.served_metadata(
        meta, stage=stage, stage_type="optimize", parent=row["path"],
        options=row["options"], measured=measured,
        done={"candidate": name, "test": row["test"]}, target=ctx.target),
                       directory)
