"""What a search writes: optimize.json (everything), optimize.md (the same
as tables a researcher reads: the budget and time spent, the parent's
serving options, the sensitivity, every candidate with what was done, its
accuracy, latency and fate, the finalists with their statistics, the audit
of predicted against measured speedups, the choice), optimize.png (accuracy
against latency with the Pareto front and the budget line) and
sensitivity.png.
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath

from rtjax.compare import pareto_front
from rtjax.optimize import audit, estimated, sensitivity
from rtjax.optimize.halving import best_rung, spent_seconds
from rtjax.optimize.screening import likely_p


def _describe(recipe: dict) -> str:
  if recipe["kind"] == "prune":
    keep = ", ".join(f"{g} {f:.2f}" for g, f in recipe["keep"].items()
                     if f < 1.0)
    tiles = (f", widths rounded up to multiples of {recipe['round_to']} (the "
             "slice's lanes)" if recipe.get("round_to", 1) > 1 else "")
    return (f"structured pruning, keep {keep}{tiles}; distilled from the "
            "parent")
  if recipe["kind"] == "drop":
    return (f"blocks {', '.join(map(str, recipe['drop']))} removed, the "
            "others with the parent's weights; distilled from the parent")
  if recipe["kind"] == "student":
    return "shallower student trained from scratch by distillation"
  return recipe["kind"]


def _trained_rungs(store, name: str) -> list[dict]:
  out, k = [], 0
  while f"job/{name}/rung{k}" in store:
    out.append(store.get(f"job/{name}/rung{k}"))
    k += 1
  return out


def summarize(settings, budget: dict, sens: dict, recipes: list[dict],
              screen: dict, trainees: list[str], rungs, store, final: dict,
              verdict: dict, chosen: str | None, floor_ms: float,
              unmet: str | None, parent_path: str) -> dict:
  """Every fact of the search as one JSON-able dict (plus its markdown)."""
  budget_ms = budget["budget_ms"]
  rows = []
  for recipe in recipes:
    name = recipe["name"]
    trained = _trained_rungs(store, name)
    if name in final:
      fate = verdict[name] or ("chosen" if name == chosen else
                               "met the limits; another was more accurate "
                               "on validation")
    elif name not in trainees:
      predicted = likely_p(screen, name, budget.get("parent_p_ms"))
      fate = (f"not trained: screening predicts {predicted:.4g} ms, over "
              f"the budget (+{100 * (settings.screen_slack - 1):.0f}%)"
              if predicted > budget.get("preliminary_ms", budget_ms)
              * settings.screen_slack else
              "not trained: more candidates fitted than max_candidates")
    elif trained:
      fate = (f"dropped after rung {len(trained) - 1} (ranked: predicted "
              "to fit the budget first, by validation accuracy, then the "
              "others by their screened p50 ratio to the parent's)")
    else:
      fate = "not trained: out of search time"
    rows.append({**recipe, "done": _describe(recipe), "screen": screen[name],
                 "rungs": trained,
                 "kept_rung": best_rung(store, name) if name in final else None,
                 "fate": fate,
                 "audit": audit.audit(screen[name], screen["parent"],
                                      floor_ms)})
  extra = []  # finalists that are not recipes: int8 variants, the parent
  for name in final:
    if name not in screen or name == "parent":
      extra.append(name)
  final_audit = {n: audit.audit(final[n], final["parent"], floor_ms)
                 for n in final if n != "parent"}
  spent = spent_seconds(store)
  return {
      "parent": parent_path, "settings": dataclasses.asdict(settings),
      "budget": budget, "floor_ms": floor_ms, "rung_steps": [
          store.get(f"rung{k}")["steps"] for k in range(len(store.data))
          if f"rung{k}" in store] or list(rungs),
      "spent_seconds": spent, "phase_seconds": store.get("phase_seconds"),
      "parent_options": store.get("parent_options"), "sensitivity": sens,
      "candidates": rows, "final": final, "final_extra": extra,
      "verdicts": verdict, "final_audit": final_audit, "chosen": chosen,
      "unmet": unmet, "time": time_spent(store, settings)}


def time_spent(store, settings) -> dict:
  """How the minutes asked were spent: seconds before training (the
  parent's options, budget, sensitivity, screening), per rung, in the final
  phase (finalists' options, final runs) and with the rivals; and why time
  was left when more than 10% was."""
  phases = store.get("phase_seconds", {})
  final = lambda n: n.startswith("options/") or n.endswith("_latency")
  parts = [("before training", sum(v for n, v in phases.items()
                                   if not final(n)))]
  k = 0
  while f"rung{k}" in store:
    jobs = [v for n, v in store.data.items()
            if n.startswith("job/") and n.endswith(f"/rung{k}")]
    steps = sorted({j["steps"] for j in jobs}) or [store.get(f"rung{k}")[
        "steps"]]
    parts.append((f"rung {k}: {len(jobs)} job(s) of "
                  f"{'/'.join(map(str, steps))} steps",
                  sum(j["seconds"] for j in jobs)))
    k += 1
  parts.append(("final: finalists' options and the final runs",
                sum(v for n, v in phases.items() if final(n)
                    and "rival" not in n)))
  parts.append(("rivals", sum(v for n, v in phases.items()
                              if final(n) and "rival" in n)))
  asked = 60 * settings.search_minutes
  left = asked - sum(v for _, v in parts)
  reason = None
  if left > 0.1 * asked:
    last = store.get(f"rung{k - 1}") if k else None
    reserve = store.get("reserve_seconds", 0.0)
    reason = (
        "no candidate was trained" if last is None else
        "the next fine-tune, estimated from the jobs so far (a cost per "
        "job and per step), did not fit before the time kept for the final "
        "phase "
        f"({reserve:.0f} s; it took {parts[-2][1] + parts[-1][1]:.0f} s)"
        if last["out_of_time"] else
        f"every planned rung and the {settings.extra_rungs} extra rung(s) "
        "were trained")
  return {"asked_seconds": asked, "parts": parts, "left_seconds": left,
          "why_left": reason}


def _time(summary: dict) -> list[str]:
  t = summary["time"]
  lines = ["", f"## Time: {(t['asked_seconds'] - t['left_seconds']) / 60:.1f}"
           f" of the {t['asked_seconds'] / 60:g} minutes asked", "",
           "| part | seconds | share of the minutes asked |",
           "|" + " --- |" * 3]
  for label, seconds in t["parts"] + [("left", t["left_seconds"])]:
    lines.append(f"| {label} | {seconds:.0f} | "
                 f"{100 * seconds / t['asked_seconds']:.0f}% |")
  if t["why_left"]:
    lines += ["", f"More than 10% was left: {t['why_left']}."]
  return lines


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def markdown(summary: dict) -> str:
  """optimize.md: the sections in the order the search ran them."""
  lines = (_header(summary) + _candidates(summary) + _scratch(summary)
           + _reserved(summary) + _finalists(summary))
  lines += _rivals(summary) + _audit(summary) + _time(summary)
  lines += ["", "![accuracy vs latency](optimize.png)", "", _outcome(summary)]
  return "\n".join(lines) + "\n"


def _target(summary: dict) -> str:
  return summary["settings"].get("target") or ""


def _p(summary: dict) -> str:
  """The latency figure's name: the percentile measured here, or a slice's
  estimate (one figure, no percentile)."""
  return "est." if _target(summary) else (
      f"p{summary['settings']['percentile']:g}")


def _ms(summary: dict, p50: float, p: float) -> str:
  return f"{p:.4g}" if _target(summary) else f"{p50:.4g} / {p:.4g}"


def _ms_label(summary: dict) -> str:
  return _p(summary) if _target(summary) else f"p50 / {_p(summary)}"


def _header(summary: dict) -> list[str]:
  s, b = summary["settings"], summary["budget"]
  memo = summary.get("compile_memo")
  lines = [
      f"# optimize: {summary['parent']}", "",
      f"Budget **{b['budget_ms']:.4g} ms** {_p(summary)} at batch "
      f"{s['batch_size']} ({b['from']}); accuracy limit "
      f"{s['max_accuracy_drop']:g} points. Its measurements and fine-tunes "
      f"took {summary['spent_seconds'] / 60:.1f} of the "
      f"{s['search_minutes']:g} minutes asked (rungs of "
      f"{', '.join(map(str, summary['rung_steps']))} steps).", ""]
  if memo:
    lines += [f"Compiled {memo['keys']} models (model, weights, batch size, "
              f"serving options) in {memo['compile_seconds']:.1f} s, at most "
              f"{memo['most_compiles_of_one_key']} time(s) each; reused "
              f"{memo['reused']} times; "
              f"{memo.get('programs_from_cache', 0)} of their XLA programs "
              "loaded from the compilation cache instead of compiled "
              "(optimize.json lists each).", ""]
  for note in (summary.get("parent_drift") or {}).values():
    lines += [f"**The machine changed** in {note}", ""]
  if _target(summary):
    lines += [f"**For {_target(summary)}, not this host**: every latency "
              f"(est.) is {estimated.label(_target(summary))}, of a call "
              f"compiled for the slice at the batch size; it excludes "
              f"{estimated.WHAT_IT_EXCLUDES}. Accuracy is measured here.", ""]
  return lines + [
      f"Parent served with {summary['parent_options']['options']} (the "
      "fastest of the options timed; every finalist gets its own).", "",
      "## Sensitivity (validation, no fine-tuning; speedups at the batch "
      f"size, {'estimated' if _target(summary) else 'one interleaved run'})",
      "",
      sensitivity.markdown(summary["sensitivity"], _p(summary),
                           one_figure=bool(_target(summary))),
      "![sensitivity](sensitivity.png)", ""]


def _candidates(summary: dict) -> list[str]:
  lines = ["## Candidates", "",
           f"| candidate | what was done | FLOPs | screened "
           f"{_ms_label(summary)} ms | rungs: val acc. (* the finalist) | "
           "fate |",
           "|" + " --- |" * 6]
  for r in summary["candidates"]:
    rungs = ", ".join(
        f"{j['steps']}: {_pct(j['val_accuracy'])}"
        f"{'*' if k == r.get('kept_rung') else ''}"
        for k, j in enumerate(r["rungs"])) or "-"
    served = [w for w, on in (
        ("patches", r["screen"].get("conv_lowering", "xla") != "xla"),
        ("embedded", r["screen"].get("embed_weights")),
        ("xla dots", r["screen"].get("dot_kernels") == "xla")) if on]
    lines.append(f"| {r['name']} | {r['done']} | {r['screen']['flops']:,.0f} "
                 f"| {_ms(summary, r['screen']['p50_ms'], r['screen']['p_ms'])}"
                 f"{' (' + ', '.join(served) + ')' if served else ''} "
                 f"| {rungs} | {r['fate']} |")
  return lines


def _scratch(summary: dict) -> list[str]:
  rule = summary.get("scratch")
  if not rule:
    return []
  text = (f"Students trained from scratch ({', '.join(rule['students'])}) "
          f"were promoted past halving until they had trained "
          f"{rule['min_steps']} steps ({summary['settings']['scratch_min_fraction']:g}"
          f" of the parent's {rule['parent_steps']})")
  if rule["parent_val_then"] is not None:
    text += (f"; the parent's own training had reached "
             f"{_pct(rule['parent_val_then'])}% validation accuracy by then "
             f"and {_pct(rule['parent_val_end'])}% at its end")
  return ["", text + "."]


def _reserved(summary: dict) -> list[str]:
  name = summary.get("reserved")
  if not name:
    return []
  return ["", f"{name} kept one of the places at every rung: of the "
          "candidates predicted to fit, the less favourable of its screened "
          "figures (p50 and tail ratios to the parent's) left the widest "
          "margin under the budget, which is set again from the parent's "
          "final runs and can fall."]


def _finalists(summary: dict) -> list[str]:
  s, p = summary["settings"], _p(summary)
  if _target(summary):
    how, latency_columns = f"XLA:TPU's estimates on {_target(summary)}", [
        f"{p} ms"]
  else:
    how = (f"{s['final_runs']} interleaved runs (medians; each run's {p} in "
           "brackets)")
    latency_columns = ["p50 ms", f"{p} ms"]
  columns = ["model", "serving options", *latency_columns,
             "test acc. % (95% CI)", "change vs parent (95% CI)", "McNemar p",
             "verdict"]
  lines = ["", f"## Finalists: {how} at batch {s['batch_size']}, test split",
           "", "| " + " | ".join(columns) + " |",
           "|" + " --- |" * len(columns)]
  for name, r in summary["final"].items():
    t, o = r["test"], r["options"]
    opts = (f"{o['conv_lowering']}, embed {o['embed_weights']}, "
            f"{o['dtype']}, widths {o['round_widths_to'] or '-'}, "
            f"{o['dot_kernels']} dots")
    verdict = summary["verdicts"][name] or (
        "**chosen**" if name == summary["chosen"] else "eligible")
    latency = (f"{r['p_ms']:.4g}" if _target(summary) else
               f"{r['p50_ms']:.4g} | {r['p_ms']:.4g} "
               f"[{', '.join(f'{v:.4g}' for v in r['p_ms_runs'])}]")
    lines.append(
        f"| {name} | {opts} | {latency} | "
        f"{_pct(t['accuracy'])} ({_pct(t['ci95'][0])}-{_pct(t['ci95'][1])}) "
        f"| {_change(t)} | {t['p_value']:.3g} | {verdict} |")
  return lines


def _change(t: dict) -> str:
  return (f"{100 * t['change']:+.2f} ({100 * t['change_ci95'][0]:+.2f} to "
          f"{100 * t['change_ci95'][1]:+.2f})")


def _rivals(summary: dict) -> list[str]:
  rivals, p = summary.get("rivals") or {}, _p(summary)
  if not rivals:
    return []
  c = rivals["chosen"]
  lines = ["", f"## Rivals: as many interleaved runs again with the "
           f"parent and the chosen model ({summary['chosen']}: {p} "
           f"{c['p_ms']:.4g} ms here; budget in these runs "
           f"{rivals['budget_ms']:.4g} ms)", "",
           f"| rival | {p} ms | meets the budget | test acc. % | change vs "
           "chosen (95% CI) | McNemar p | significantly more accurate? |",
           "|" + " --- |" * 7]
  for name, r in rivals["rows"].items():
    v = r["vs_chosen"]
    better = v["significant"] and v["change"] > 0
    lines.append(f"| {name} | {r['p_ms']:.4g} | "
                 f"{'yes' if r['meets_budget'] else 'no'} | "
                 f"{_pct(v['accuracy'])} | {_change(v)} | {v['p_value']:.3g} "
                 f"| {'**yes**' if better else 'no'} |")
  return lines


def _audit(summary: dict) -> list[str]:
  if _target(summary):
    return _target_audit(summary)
  lines = ["", "## Audit: is it really faster?", "",
           "Predicted speedups from FLOPs and from XLA's cost model "
           "(t_compute + t_memory + t_comm, rtjax.bench.breakdown) against "
           "the measured p50 speedup over the parent in the same run "
           "(screening for candidates, the final runs for finalists). "
           "Fixed per-call floor (a trivial jitted call): "
           f"{summary['floor_ms']:.4g} ms.", "",
           "| model | run | predicted (FLOPs) | predicted (roofline) | "
           f"measured p50 | measured {_p(summary)} | paid? |",
           "|" + " --- |" * 7]
  for name, run, a in _audit_entries(summary):
    paid = "yes" if a["paid"] else "**no**: " + "; ".join(a["reasons"])
    lines.append(f"| {name} | {run} | {a['predicted_flops']:.2f}x | "
                 f"{a['predicted_roofline']:.2f}x | {a['measured_p50']:.2f}x | "
                 f"{a['measured_p']:.2f}x | {paid} |")
  return lines


def _audit_entries(summary: dict) -> list[tuple[str, str, dict]]:
  """(model, run, audit): every candidate at screening, then the finalists."""
  return ([(r["name"], "screening", r["audit"]) for r in summary["candidates"]]
          + [(n, "final", a) for n, a in summary["final_audit"].items()])


def _target_audit(summary: dict) -> list[str]:
  """The audit for a slice: XLA:TPU's estimated speedup beside the FLOPs
  ratio (all predicted), and why a compression did not pay there."""
  lines = ["", f"## Audit: does it pay on {_target(summary)}?", "",
           "Every figure predicted: the FLOPs ratio, the roofline's (t_compute"
           " + t_memory + t_comm with the slice's published peaks) and "
           f"{estimated.label(_target(summary))}, over the parent's, at the "
           f"batch size. A candidate with {audit.FEWER_FLOPS:.2f}x fewer "
           f"FLOPs or more whose estimated speedup is under {audit.PAYS:g}x "
           "is named with the padding that ate it.", "",
           "| model | stage | FLOPs ratio | roofline | estimated speedup "
           "(XLA:TPU) | data in tiles | pays? |", "|" + " --- |" * 7]
  rows = {r["name"]: r["screen"] for r in summary["candidates"]}
  for name, stage, a in _audit_entries(summary):
    padding = (summary["final"].get(name) if stage == "final"
               else rows.get(name) or {}).get("padding") or {}
    share = (f"{padding['data_share']:.0%}" if "data_share" in padding
             else "-")
    paid = "yes" if a["paid"] else "**no**: " + "; ".join(a["reasons"])
    lines.append(f"| {name} | {stage} | {a['predicted_flops']:.2f}x | "
                 f"{a['predicted_roofline']:.2f}x | {a['measured_p50']:.2f}x "
                 f"| {share} | {paid} |")
  return lines


def _outcome(summary: dict) -> str:
  if not summary["chosen"]:
    return f"**Nothing chosen**: {summary['unmet']}"
  r = summary["final"][summary["chosen"]]
  t = r["test"]
  return (f"**Chosen: {summary['chosen']}**: {_p(summary)} {r['p_ms']:.4g} "
          f"ms against the {summary['budget']['budget_ms']:.4g} ms budget, "
          f"test accuracy {_pct(t['accuracy'])}% (change "
          f"{100 * t['change']:+.2f} points, McNemar p = {t['p_value']:.3g}: "
          f"{'significant' if t['significant'] else 'not significant'} at "
          "5%); written to `best` with its serving options.")


def plot(summary: dict, path: epath.Path) -> None:
  """Test accuracy against the finalists' measured latency, the Pareto
  front and the budget line; trained candidates that did not reach the
  final run in grey (validation accuracy, screening latency)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in summary["candidates"]:
    if r["rungs"] and r["name"] not in summary["final"]:
      ax.scatter(r["screen"]["p_ms"], 100 * r["rungs"][-1]["val_accuracy"],
                 color="lightgray")
      ax.annotate(r["name"], (r["screen"]["p_ms"],
                              100 * r["rungs"][-1]["val_accuracy"]),
                  fontsize=7, color="gray", textcoords="offset points",
                  xytext=(4, 2))
  names = list(summary["final"])
  points = [(summary["final"][n]["test"]["accuracy"],
             summary["final"][n]["p_ms"]) for n in names]
  ax.scatter([x for _, x in points], [100 * a for a, _ in points])
  for n, (a, x) in zip(names, points):
    ax.annotate(n + (" (chosen)" if n == summary["chosen"] else ""),
                (x, 100 * a), textcoords="offset points", xytext=(5, 3))
  front = pareto_front(points)
  ax.plot([points[i][1] for i in front], [100 * points[i][0] for i in front],
          "r--", label="Pareto front")
  pct = (f"XLA:TPU-estimated (on {_target(summary)}, predicted)"
         if _target(summary) else _p(summary))
  ax.axvline(summary["budget"]["budget_ms"], color="gray", linestyle=":",
             label=f"budget {summary['budget']['budget_ms']:.3f} ms")
  ax.set_xlabel(f"{pct} latency at batch {summary['settings']['batch_size']}"
                " (ms)")
  ax.set_ylabel("accuracy (%): test for finalists, val in grey")
  ax.legend(loc="lower right")
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def write(summary: dict, workdir: epath.Path, sens: dict) -> None:
  summary["markdown"] = markdown(summary)
  (workdir / "optimize.md").write_text(summary["markdown"])
  (workdir / "optimize.json").write_text(json.dumps(summary, indent=1))
  plot(summary, workdir / "optimize.png")
  sensitivity.plot(sens, workdir / "sensitivity.png")
