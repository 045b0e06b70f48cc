"""The most accurate model that meets a measured latency budget on this
device, with the evidence (rtjax.optimize):

  python -m experiments.optimize --checkpoint=workdirs/default --workdir=workdirs/optimize_default \
      --latency_budget_ms=3 --batch_size=256 [--percentile=99] [--max_accuracy_drop=1.0] \
      [--search_minutes=15]
  python -m experiments.optimize ... --budget_of_parent=0.5   # half the parent's measured latency

Writes <workdir>/optimize.md/.json/.png, sensitivity.png, a stage per
candidate rung under <workdir>/candidates/, the parent as measured at
<workdir>/parent and the chosen checkpoint at <workdir>/best (its serving
options recorded for this kind of device), and its XLA programs in
<workdir>/xla_cache (a program met again, e.g. a model with other weights
passed as arguments, or in a resumed run, is loaded instead of compiled).
Rerunning the same command resumes. Exit code 1 when no candidate meets the budget, with the closest
one and what it would need; 2 for a user error.
"""

from absl import flags
from etils import epath

from experiments import cli
from rtjax.bench import provenance
from rtjax.infer.cache import enable_compilation_cache
from rtjax.optimize import BudgetNotMet, Settings, run_search
from rtjax.optimize.memo import compilation_cache_dir


_CHECKPOINT = cli.define_checkpoint("The float checkpoint to optimize "
                                    "(workdir, its checkpoints/ or a step).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Search directory; reusing it "
                               "resumes.", required=True)
# Every search setting, named and documented once (rtjax.optimize.settings).
_SETTINGS = cli.DataclassFlags(Settings)
flags.adopt_module_key_flags(cli)  # those flags in --help, not only --helpfull
_RESULTS = flags.DEFINE_string("results", "", "Also write optimize.md, "
                               "stamped with how it was measured, here (and "
                               "the plot beside it), e.g. "
                               "experiments/results/optimize_x.md.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "", "Persistent XLA compilation cache: '' the "
    "one JAX_COMPILATION_CACHE_DIR names, else <workdir>/xla_cache; 'none': "
    "no cache.")


def main(argv):
  if len(argv) > 1:
    raise cli.FlagError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_orbax()
  import jax  # after flags: the CPU client's dispatch mode is set once
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  settings = _SETTINGS.value()
  workdir = epath.Path(_WORKDIR.value)
  cache = compilation_cache_dir(workdir, _CACHE.value,
                                jax.config.jax_compilation_cache_dir)
  if cache:
    enable_compilation_cache(cache)
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
