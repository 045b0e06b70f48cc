"""The most accurate model that meets a measured latency budget on this
device, with the evidence (rtjax.optimize):

  python -m experiments.optimize --checkpoint=workdirs/default --workdir=workdirs/optimize_default \
      --latency_budget_ms=3 --batch_size=256 [--percentile=99] [--max_accuracy_drop=1.0] \
      [--search_minutes=15]
  python -m experiments.optimize ... --budget_of_parent=0.5   # half the parent's measured latency

Writes <workdir>/optimize.md/.json/.png, sensitivity.png, a stage per
candidate rung under <workdir>/candidates/, the parent as measured at
<workdir>/parent and the chosen checkpoint at <workdir>/best (its serving
options recorded for this kind of device). Rerunning the same command
resumes. Exit code 1 when no candidate meets the budget, with the closest
one and what it would need; 2 for a user error.
"""

from absl import flags
from etils import epath

from experiments import cli
from rtjax.bench import provenance
from rtjax.infer.cache import enable_compilation_cache
from rtjax.optimize import BudgetNotMet, Settings, run_search


def _defaults(name: str) -> list[str]:
  return [f"{v:g}" for v in getattr(Settings, name)]


_CHECKPOINT = cli.define_checkpoint("The float checkpoint to optimize (workdir, its "
                      "checkpoints/ or a step).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Search directory; reusing it "
                               "resumes.", required=True)
_BUDGET = flags.DEFINE_float("latency_budget_ms", 0.0, "Latency budget (ms) "
                             "at --batch_size and --percentile.")
_OF_PARENT = flags.DEFINE_float("budget_of_parent", 0.0, "Instead of "
                                "--latency_budget_ms: this fraction of the "
                                "parent's latency, measured first.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Batch size of the budget.",
                              lower_bound=1)
_PERCENTILE = flags.DEFINE_float("percentile", 99.0, "Latency percentile.")
_DROP = flags.DEFINE_float("max_accuracy_drop", 1.0, "Most test accuracy "
                           "(points) the chosen model may lose.")
_MINUTES = flags.DEFINE_float("search_minutes", 15.0, "About how long the "
                              "search may take.")
_RUNGS = flags.DEFINE_list("rung_steps", [], "Fine-tuning steps per "
                           "successive-halving rung; default 1/20, 3/20 and "
                           "9/20 of the parent's training steps.")
_MAX_CANDIDATES = flags.DEFINE_integer("max_candidates", 8, "Most "
                                       "candidates trained at the first rung.")
_MAX_FINALISTS = flags.DEFINE_integer("max_finalists", 3, "Candidates in "
                                      "the final interleaved run.")
_KEEP = flags.DEFINE_list("keep_fractions", _defaults("keep_fractions"), "Keep "
                          "fractions of the sensitivity, per group.")
_GROUPS = flags.DEFINE_string("sensitivity_groups", ".*", "Regex of the "
                              "prunable groups the sensitivity analyzes.")
_UNIFORM = flags.DEFINE_list("uniform", _defaults("uniform"),
                             "Uniformly pruned candidates (keep fractions).")
_THRESHOLDS = flags.DEFINE_list("thresholds", _defaults("thresholds"), "Per-group "
                                "candidates: the accuracy (points) each group "
                                "may lose untuned.")
_SHALLOW = flags.DEFINE_bool("shallow", True, "Also shallower students.")
_INT8 = flags.DEFINE_bool("int8", True, "Measure int8 per layer and add int8 "
                          "variants where it measured faster.")
_AUTO = flags.DEFINE_bool("auto_lowering", True, "Also time banded conv "
                          "lowerings when choosing serving options.")
_MEASURE = flags.DEFINE_float("measure_seconds", 4.0, "Seconds per "
                              "interleaved screening/sensitivity run.")
_FINAL = flags.DEFINE_float("final_seconds", Settings.final_seconds,
                            "Seconds of each final interleaved run.")
_FINAL_RUNS = flags.DEFINE_integer("final_runs", Settings.final_runs, "Final "
                                   "interleaved runs (figures: medians).",
                                   lower_bound=1)
_RIVALS = flags.DEFINE_list("rivals", [], "Checkpoints (or a pipeline's "
                            "workdir: all its stages) measured in the final "
                            "run and tested against the chosen model.")
_RESULTS = flags.DEFINE_string("results", "", "Also write optimize.md, "
                               "stamped with how it was measured, here (and "
                               "the plot beside it), e.g. "
                               "experiments/results/optimize_x.md.")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "", "Persistent XLA "
                             "compilation cache ('' : none).")


def numbers(name: str, values: list[str], low: float = 0.0,
            high: float = 1.0) -> tuple[float, ...]:
  """A --name list of numbers in (low, high)."""
  try:
    out = tuple(float(v) for v in values)
  except ValueError:
    out = (low,)
  if any(not low < f < high for f in out):
    raise cli.FlagError(f"--{name}={','.join(values)}: give numbers in "
                        f"({low:g}, {high:g}) separated by commas")
  return out


def main(argv):
  if len(argv) > 1:
    raise cli.FlagError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_orbax()
  import jax  # after flags: the CPU client's dispatch mode is set once
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if _CACHE.value:
    enable_compilation_cache(_CACHE.value)
  settings = Settings(
      latency_budget_ms=_BUDGET.value, budget_of_parent=_OF_PARENT.value,
      batch_size=_BATCH.value, percentile=_PERCENTILE.value,
      max_accuracy_drop=_DROP.value, search_minutes=_MINUTES.value,
      rung_steps=tuple(cli.positive_ints("rung_steps", _RUNGS.value))
      if _RUNGS.value else (), max_candidates=_MAX_CANDIDATES.value,
      max_finalists=_MAX_FINALISTS.value,
      keep_fractions=numbers("keep_fractions", _KEEP.value),
      sensitivity_groups=_GROUPS.value,
      uniform=numbers("uniform", _UNIFORM.value),
      thresholds=numbers("thresholds", _THRESHOLDS.value, 0.0, 100.0),
      shallow=_SHALLOW.value, int8=_INT8.value, try_auto_lowering=_AUTO.value,
      measure_seconds=_MEASURE.value, final_seconds=_FINAL.value,
      final_runs=_FINAL_RUNS.value,
      rivals=tuple(_RIVALS.value))
  workdir = epath.Path(_WORKDIR.value)
  try:
    run_search(_CHECKPOINT.value, workdir, settings)
    failure = None
  except BudgetNotMet as e:
    failure = str(e)
  report = workdir / "optimize.md"
  if report.exists():  # written whether or not a candidate qualified
    print(report.read_text(), flush=True)
    if _RESULTS.value:
      path = provenance.write_results(_RESULTS.value, report.read_text())
      (workdir / "optimize.png").copy(path.with_suffix(".png"),
                                      overwrite=True)
  if failure:
    cli.fail(failure, code=1)


if __name__ == "__main__":
  cli.run(main)
