"""The choice among the finalists, measured in one interleaved run and on
the test split: the most accurate on validation (selection never looks at
the test split) among those whose latency meets the budget and whose test
accuracy is at most `max_drop` points under the parent's; ties go to the
faster. The test split then says, with its interval and McNemar's test,
whether the chosen model's change is distinguishable from noise; a loss
it calls significant disqualifies (unless reject_significant_loss is off)."""

from __future__ import annotations


def verdicts(final: dict, budget_ms: float, max_drop: float,
             parent_fits: bool, reject_significant: bool = True
             ) -> dict[str, str]:
  """{name: '' (eligible) or why it is not}; with `reject_significant`, a
  loss that McNemar's test calls significant at 5% is one even when it is
  under `max_drop`."""
  out = {}
  for name, row in final.items():
    drop = -100 * row["test"]["change"]
    if row["p_ms"] > budget_ms:
      out[name] = (f"over budget: {row['p_ms']:.4g} ms > {budget_ms:.4g} ms")
    elif name == "parent" and not parent_fits:
      out[name] = "the reference (over budget when screened)"
    elif drop > max_drop:
      out[name] = (f"loses {drop:.2f} points of test accuracy (limit "
                   f"{max_drop:g}; McNemar p = {row['test']['p_value']:.3g})")
    elif reject_significant and drop > 0 and row["test"]["significant"]:
      out[name] = (f"significantly less accurate: {drop:.2f} points "
                   f"(McNemar p = {row['test']['p_value']:.3g} < 0.05)")
    else:
      out[name] = ""
  return out


def choose(final: dict, verdict: dict[str, str]) -> str | None:
  eligible = [n for n, why in verdict.items() if not why]
  if not eligible:
    return None
  return max(eligible, key=lambda n: (final[n]["val_accuracy"],
                                      -final[n]["p_ms"]))


def accuracy_unmet(final: dict, budget_ms: float, max_drop: float) -> str:
  """Why nothing qualifies when some finalists meet the budget but lose too
  much accuracy."""
  fast = [n for n, r in final.items() if r["p_ms"] <= budget_ms]
  best = max(fast, key=lambda n: final[n]["test"]["accuracy"])
  t = final[best]["test"]
  low, high = t["change_ci95"]
  return (f"no candidate meets both the {budget_ms:.4g} ms budget and the "
          f"{max_drop:g}-point accuracy limit: the most accurate within the "
          f"budget, {best}, loses {-100 * t['change']:.2f} points of test "
          f"accuracy (95% CI of the change {100 * low:+.2f} to "
          f"{100 * high:+.2f}; McNemar p = {t['p_value']:.3g}); a longer "
          "--search_minutes (longer fine-tunes) or a larger budget would be "
          "needed")
