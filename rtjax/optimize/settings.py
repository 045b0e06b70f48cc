"""What a search is told: every setting declared once, with its default,
its help and what makes it valid. The command's flags
(experiments.optimize) and the `optimize` stage type's keys
(rtjax.optimize.stage) are both derived from these fields, so they have the
same names and defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from rtjax.errors import UserError
from rtjax.optimize import candidates, sensitivity


def setting(default, help: str, valid: Callable[[object], bool] | None = None,
            expected: str = ""):
  """A field with its help and, optionally, a validity test (`expected`
  says what a valid value is)."""
  return dataclasses.field(default=default, metadata={
      "help": help, "valid": valid, "expected": expected})


def _all(test: Callable[[float], bool]) -> Callable[[tuple], bool]:
  return lambda values: all(test(v) for v in values)


def _fraction(v: float) -> bool:
  return 0 < v < 1


@dataclasses.dataclass
class Settings:
  """What the command's flags (and the `optimize` stage's keys) set."""
  latency_budget_ms: float = setting(
      0.0, "Latency budget (ms) at batch_size and percentile.")
  target: str = setting(
      "", "A Cloud TPU slice to optimize for instead of this host "
      "(v5litepod-8, tpu:v5e:2x4; needs the [tpu] extra): every latency is "
      "then XLA:TPU's estimate of a call's device time on the slice "
      "(predicted, uncalibrated; no percentile), and accuracy is measured "
      "here.")
  budget_of_parent: float = setting(
      0.0, "Instead of latency_budget_ms: this fraction of the parent's "
      "latency, measured first and again in the final interleaved runs.")
  batch_size: int = setting(1, "Batch size of the budget.",
                            lambda v: v >= 1, "an integer >= 1")
  percentile: float = setting(99.0, "Latency percentile of the budget.",
                              lambda v: 0 < v <= 100, "in (0, 100]")
  max_accuracy_drop: float = setting(
      1.0, "Most test accuracy (points) the chosen model may lose.",
      lambda v: v >= 0, ">= 0")
  reject_significant_loss: bool = setting(
      True, "Also reject a loss of test accuracy that McNemar's test calls "
      "significant at 5%, even under max_accuracy_drop.")
  search_minutes: float = setting(15.0, "About how long the search may take.",
                                  lambda v: v > 0, "> 0")
  rung_steps: tuple[int, ...] = setting(
      (), "Fine-tuning steps per successive-halving rung; empty: 1/20, 3/20 "
      "and 9/20 of the parent's training steps.", _all(lambda s: s >= 1),
      "integers >= 1")
  extra_rungs: int = setting(
      6, "Longer rungs (halving_eta times the steps each) for the finalists "
      "while search time is left.", lambda v: v >= 0, ">= 0")
  halving_eta: int = setting(
      2, "Successive halving keeps 1/halving_eta of the candidates per rung "
      "(never fewer than max_finalists).", lambda v: v >= 2, ">= 2")
  keep_fractions: tuple[float, ...] = setting(
      sensitivity.FRACTIONS, "Keep fractions the sensitivity measures per "
      "prunable group.", _all(_fraction), "numbers in (0, 1)")
  sensitivity_groups: str = setting(
      ".*", "Regex of the prunable groups the sensitivity analyzes.")
  uniform: tuple[float, ...] = setting(
      candidates.UNIFORM, "Uniformly pruned candidates (keep fractions).",
      _all(_fraction), "numbers in (0, 1)")
  thresholds: tuple[float, ...] = setting(
      candidates.THRESHOLDS, "Per-group candidates: the validation accuracy "
      "(points) each group may lose untuned.", _all(lambda v: 0 < v < 100),
      "numbers in (0, 100)")
  shallow: bool = setting(True, "Also shallower students of the family, "
                          "trained from scratch.")
  layer_drop: bool = setting(
      True, "Also candidates made of the parent's own blocks (layer "
      "dropping), for a family that declares droppable blocks.")
  scratch_min_fraction: float = setting(
      0.2, "Halving drops no student trained from scratch before it has "
      "trained this fraction of the parent's training steps (it learns "
      "slower at first than candidates that start from trained weights; "
      "the default is where the Transformers' own validation curves came "
      "within 10 points of their end, the report gives the parent's).",
      lambda v: 0 <= v <= 1, "in [0, 1]")
  int8: bool = setting(True, "Measure int8 per layer and add int8 variants "
                       "of the finalists where it measured faster.")
  int8_min_speedup: float = setting(
      1.05, "A layer's int8 is used when it alone measured at least this "
      "p50 speedup at the batch size ...", lambda v: v > 0, "> 0")
  int8_max_accuracy_drop: float = setting(
      0.5, "... and lost at most these points of validation accuracy.",
      lambda v: v >= 0, ">= 0")
  max_candidates: int = setting(8, "Most candidates trained at the first "
                                "rung.", lambda v: v >= 1, ">= 1")
  max_finalists: int = setting(3, "Candidates in the final interleaved runs.",
                               lambda v: v >= 1, ">= 1")
  screen_slack: float = setting(
      1.5, "An architecture is trained when screening predicts it within "
      "this factor of the budget (the finalists' own tuned serving options "
      "are often faster than screening's fixed variants).",
      lambda v: v >= 1, ">= 1")
  fine_tune_lr: float = setting(
      0.3, "Pruned candidates fine-tune at this fraction of the parent's "
      "learning rate (their weights start trained; students from scratch "
      "use the whole rate).", lambda v: v > 0, "> 0")
  measure_seconds: float = setting(
      4.0, "Seconds per interleaved screening, sensitivity and serving "
      "options run.", lambda v: v > 0, "> 0")
  final_seconds: float = setting(
      10.0, "Seconds of each final interleaved run.", lambda v: v > 0, "> 0")
  final_runs: int = setting(3, "Final interleaved runs (figures: medians).",
                            lambda v: v >= 1, ">= 1")
  auto_lowering: bool = setting(
      True, "Also time banded conv lowerings when choosing serving options.")
  rivals: tuple[str, ...] = setting(
      (), "Checkpoints (or a pipeline's workdir: all its stages) measured in "
      "the final runs and tested against the chosen model, never chosen.")

  def problems(self) -> list[tuple[str, str]]:
    """[(setting, what is wrong with it)]; empty when the settings are valid."""
    out = []
    if (self.latency_budget_ms > 0) == (self.budget_of_parent > 0):
      out.append(("latency_budget_ms", "give exactly one of "
                  "latency_budget_ms (> 0) and budget_of_parent (> 0, a "
                  "fraction of the parent's measured latency)"))
    for field in dataclasses.fields(self):
      valid = field.metadata["valid"]
      value = getattr(self, field.name)
      if valid is not None and not valid(value):
        out.append((field.name, f"invalid value {value!r}: give "
                    f"{field.metadata['expected']}"))
    return out

  def check(self) -> None:
    problems = self.problems()
    if problems:
      name, problem = problems[0]
      raise UserError(f"{name}: {problem}")

  def budget(self, parent_p_ms: float | None, where: str) -> dict:
    """{'budget_ms', 'from'[, 'parent_p_ms']}: latency_budget_ms, or
    budget_of_parent times the parent's latency measured `where`."""
    if self.latency_budget_ms:
      return {"budget_ms": self.latency_budget_ms, "from": "given"}
    figure = (f"XLA:TPU estimate on {self.target}" if self.target
              else f"p{self.percentile:g}")
    return {"budget_ms": self.budget_of_parent * parent_p_ms,
            "from": f"{self.budget_of_parent:g} x the parent's "
                    f"{figure}{where} ({parent_p_ms:.4g} ms)",
            "parent_p_ms": parent_p_ms}
