"""Runs an experiment on every host of a Cloud TPU VM or pod slice.

  python -m experiments.launch --tpu=my-tpu --zone=us-west4-a --project=my-proj \
      --accelerator_type=v5litepod-8 --create --delete_after -- \
      --config=configs/default.py:tpu --workdir=gs://my-bucket/runs/default

Everything after `--` goes to `python -m experiments.main` on each worker, run
in a virtual environment that the setup step builds there with uv.

Before anything is created, the experiment's train step and the serving
executables its report times are compiled for --accelerator_type on this host
(rtjax.target.preflight; needs the [tpu] extra): one that the TPU compiler
refuses or that needs more HBM per chip than a chip has stops the launch with
exit 2 and one line. --skip_preflight skips it. --dry_run prints the check's
table and the exact commands, and runs nothing.
"""

import shlex

from absl import flags

from experiments import cli
from rtjax import target, tpu
from rtjax.target import preflight

_TPU = flags.DEFINE_string("tpu", None, "TPU name.", required=True)
_ZONE = flags.DEFINE_string("zone", None, "GCP zone.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "GCP project.", required=True)
_ACCELERATOR = flags.DEFINE_string("accelerator_type", "v5litepod-8",
                                   "e.g. v4-8, v5litepod-8, v5p-16, v6e-8.")
_RUNTIME = flags.DEFINE_string(
    "runtime_version", tpu.TpuSpec.runtime_version, "TPU software version "
    "(gcloud --version); default: the one Google lists for the generation, "
    + ", ".join(f"{g}: {v}" for g, v in tpu.RUNTIME_VERSIONS.items()) + ".")
_CREATE = flags.DEFINE_bool("create", tpu.LaunchPlan.create,
                            "Create the TPU first.")
_QUEUED = flags.DEFINE_bool("queued", tpu.TpuSpec.queued,
                            "Create through queued resources.")
_SPOT = flags.DEFINE_bool("spot", tpu.TpuSpec.spot,
                          "Spot (preemptible) capacity.")
_DELETE = flags.DEFINE_bool("delete_after", tpu.LaunchPlan.delete_after,
                            "Delete the TPU at the end, also when the run "
                            "fails.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
_SOURCE = flags.DEFINE_string("source_dir", tpu.LaunchPlan.source_dir,
                              "Local code to copy.")
_REMOTE = flags.DEFINE_string("remote_dir", tpu.LaunchPlan.remote_dir,
                              "Code directory on workers.")
_GIT_URL = flags.DEFINE_string("git_url", tpu.LaunchPlan.git_url, "Clone this "
                               "repository on the workers instead of copying "
                               "--source_dir.")
_GIT_REF = flags.DEFINE_string("git_ref", "main", "Ref to check out with --git_url.")
_LOG_DIR = flags.DEFINE_string("launch_logs", tpu.LaunchPlan.log_dir,
                               "Local logs, one per worker.")
_SKIP_PREFLIGHT = flags.DEFINE_bool(
    "skip_preflight", False, "Launch without first compiling the experiment "
    "for --accelerator_type on this host (the check needs libtpu: the [tpu] "
    "extra).")


def check(plan: tpu.LaunchPlan) -> None:
  """The pre-flight table printed; a PreflightError (exit 2) when an
  executable cannot run on the slice."""
  rows = preflight.check(plan.main_args, plan.tpu.accelerator_type)
  table = target.markdown_table(rows).splitlines()
  print("\n".join(f"# {line}".rstrip() for line in [
      f"pre-flight of the experiment on {plan.tpu.accelerator_type}:", *table]),
        flush=True)
  preflight.require_fit(rows)


def main(argv):
  plan = tpu.LaunchPlan(
      tpu=tpu.TpuSpec(_TPU.value, _ZONE.value, _PROJECT.value,
                      _ACCELERATOR.value, _RUNTIME.value, _SPOT.value,
                      _QUEUED.value),
      main_args=list(argv[1:]), create=_CREATE.value,
      delete_after=_DELETE.value, source_dir=_SOURCE.value,
      remote_dir=_REMOTE.value, git_url=_GIT_URL.value, git_ref=_GIT_REF.value,
      log_dir=_LOG_DIR.value)
  if not _SKIP_PREFLIGHT.value:
    check(plan)
  if _DRY_RUN.value:
    if not plan.git_url:
      print(f"# package the git-tracked files of {plan.source_dir} into "
            f"{plan.archive}")
    for command in plan.commands():
      print(shlex.join(command))
    return
  try:
    tpu.launch(plan)
  except tpu.RemoteCommandError as e:
    cli.fail(str(e), code=1)
  print(f"done: {plan.workers} worker(s); logs in {_LOG_DIR.value}")


if __name__ == "__main__":
  cli.run(main)
