"""Screening: every candidate architecture timed in one interleaved run with
the parent before anything is trained (latency does not depend on the
weights), with its FLOPs, the time XLA's cost model predicts and, for
pruned ones, the validation accuracy before fine-tuning. Architectures that
cannot meet the budget are never trained.
"""

from __future__ import annotations

from rtjax.bench import breakdown
from rtjax.infer import lowering as lowering_lib
from rtjax.models import forward_flops
from rtjax.optimize import audit, candidates, serving
from rtjax.train.evaluate import evaluate

SCREEN_SLACK = 1.5  # an architecture predicted within 50% of the budget is trained


def cost_row(name, model, spec, compiled, lat, peaks, batch) -> dict:
  """A measured model's latency with what predicts it: FLOPs, XLA's
  t_compute + t_memory + t_comm, achieved GFLOP/s, how int8 layers were compiled."""
  terms = breakdown.breakdown(compiled.executables[batch], peaks)
  flops = forward_flops(model, spec["args"]["input_shape"])
  return {"name": name, "flops": flops, "args": spec["args"],
          "t_predicted_s": terms["t_predicted_s"],
          "bytes_accessed": terms["bytes_accessed"],
          "gflops_per_s": flops * batch / (lat["p50_ms"] * 1e-3) / 1e9,
          "int8_lowering": audit.int8_lowering(
              compiled.executables[batch].as_text()),
          **{k: lat[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p_ms")}}


def screen(parent, spec: dict, recipes: list[dict], batch: int,
           percentile: float, parent_options: dict, peaks: dict, val,
           seconds: float) -> dict:
  """{name: cost row} for the parent and every recipe, served with the
  parent's options under two fixed conv lowerings, XLA's convs and every
  conv as patches (when it has convs), the faster kept: which lowering
  wins changes with the widths, so one for all would misjudge some
  candidates, and tuning one per candidate here would rank them partly by
  the noise of the tuning runs. The finalists get their tuned lowering;
  SCREEN_SLACK leaves room for it."""
  base = {**parent_options, "round_widths_to": 0}
  models, served = [], []
  for recipe in [None, *recipes]:
    model, s = ((parent, spec) if recipe is None else
                candidates.build(recipe, parent, spec))
    name = "parent" if recipe is None else recipe["name"]
    patches = lowering_lib.describe(lowering_lib.all_patches(
        model, s["args"]["input_shape"]))
    for conv_lowering in dict.fromkeys(("xla", patches)):
      models.append((name, model, s))
      served.append(serving.compile_with(model, s, batch, {
          **base, "conv_lowering": conv_lowering}))
  latency = serving.interleaved(served, batch, percentile, seconds)
  fastest = {}
  for (name, model, s), compiled, lat in zip(models, served, latency):
    if name not in fastest or lat["p50_ms"] < fastest[name][3]["p50_ms"]:
      fastest[name] = (model, s, compiled, lat)
  pruned = {r["name"] for r in recipes if r["kind"] == "prune"}
  out = {}
  for name, (model, s, compiled, lat) in fastest.items():
    row = cost_row(name, model, s, compiled, lat, peaks, batch)
    row["conv_lowering"] = lowering_lib.describe(compiled.conv_lowering[batch])
    if name == "parent" or name in pruned:
      row["untuned_val_accuracy"] = evaluate(model, val, 512)["accuracy"]
    out[name] = row
  return out


def screened_p(screen_rows: dict, name: str,
               parent_p_ms: float | None = None) -> float:
  """A candidate architecture's percentile latency as screening predicts it:
  its p50 relative to the parent's in the same run, times the parent's
  percentile latency (`parent_p_ms`, e.g. the one the budget was set from;
  default: the parent's in this run). A tail percentile of a few hundred
  calls on a shared machine is mostly noise; the medians rank
  architectures, and the final interleaved run measures the tails of those
  that are trained."""
  parent = screen_rows["parent"]
  reference = parent_p_ms or parent["p_ms"]
  return screen_rows[name]["p50_ms"] / parent["p50_ms"] * reference
