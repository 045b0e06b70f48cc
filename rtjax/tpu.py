"""Cloud TPU launch plan: the exact gcloud commands that create a TPU VM (or
pod slice), ship the code to every worker, run an experiment on all of them
and delete the TPU, and a runner that executes them with one log per worker.

The workers' own python3 is too old for rtjax (the runtime images are Ubuntu
22.04 with Python 3.10; jax >= 0.7 needs 3.11), so setup builds a virtual
environment with uv, which fetches a supported Python, and every remote
command runs rtjax with that environment's interpreter.

Every value reaches the remote shell through shlex.quote, and local commands
run without a shell, so no flag value can inject a command.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tarfile
import time
from typing import Sequence

from etils import epath

from rtjax import accelerators, errors

# The TPU software version (gcloud --version) Google lists for JAX, per
# accelerator type prefix ("v5litepod": "v2-alpha-tpuv5-lite", ...).
RUNTIME_VERSIONS = {g.type_prefix: g.runtime_version
                    for g in accelerators.GENERATIONS}


def parse_accelerator(accelerator_type: str) -> accelerators.Accelerator:
  """The slice gcloud creates for `accelerator_type` ('v5litepod-8'); a type
  gcloud does not offer is the user's to fix (a LaunchError naming the valid
  ones)."""
  acc = accelerators.accelerator(accelerator_type)
  if acc.type_name != accelerator_type:  # a topology, not a gcloud type
    raise errors.LaunchError(
        f"--accelerator_type takes the type gcloud creates: {acc.type_name} "
        f"for {accelerator_type}")
  return acc


def num_workers(accelerator_type: str) -> int:
  """Host VMs in the slice: one runs the experiment each."""
  return parse_accelerator(accelerator_type).hosts


@dataclasses.dataclass(frozen=True)
class TpuSpec:
  name: str
  zone: str
  project: str
  accelerator_type: str
  runtime_version: str = ""
  spot: bool = False
  queued: bool = False

  def __post_init__(self):
    parse_accelerator(self.accelerator_type)  # fail before any gcloud call

  @property
  def runtime(self) -> str:
    return self.runtime_version or parse_accelerator(
        self.accelerator_type).generation.runtime_version

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]


def create_command(tpu: TpuSpec) -> list[str]:
  if tpu.queued:
    command = ["gcloud", "compute", "tpus", "queued-resources", "create",
               tpu.name, f"--node-id={tpu.name}",
               f"--runtime-version={tpu.runtime}"]
  else:
    command = ["gcloud", "compute", "tpus", "tpu-vm", "create", tpu.name,
               f"--version={tpu.runtime}"]
  command += [f"--accelerator-type={tpu.accelerator_type}", *tpu._where()]
  if tpu.spot:
    command.append("--spot")
  return command


def wait_ready_command(tpu: TpuSpec) -> list[str] | None:
  """Queued resources are granted later: block until ACTIVE."""
  if not tpu.queued:
    return None
  return ["gcloud", "compute", "tpus", "queued-resources", "describe",
          tpu.name, *tpu._where(), "--format=value(state.state)"]


def delete_command(tpu: TpuSpec) -> list[str]:
  if tpu.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "delete",
            tpu.name, *tpu._where(), "--force", "--quiet"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", tpu.name,
          *tpu._where(), "--quiet"]


def ssh_command(tpu: TpuSpec, worker: str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu.name,
          *tpu._where(), f"--worker={worker}", f"--command={remote}"]


ARCHIVE = "rtjax-source.tar.gz"


def package_source(source_dir: str, out: epath.PathLike) -> epath.Path:
  """The files under `source_dir` that git does not ignore (so no venv, no
  workdirs; uncommitted edits included), as a tarball."""
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], cwd=source_dir, check=True,
                         capture_output=True, text=True).stdout.split("\0")
  out = epath.Path(out)
  with tarfile.open(out, "w:gz") as tar:
    for name in filter(None, files):
      tar.add(os.path.join(source_dir, name), arcname=name)
  return out


def copy_command(tpu: TpuSpec, archive: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
          f"{tpu.name}:{ARCHIVE}", *tpu._where(), "--worker=all"]


# The environment rtjax runs in on every worker, inside the code directory
# (git ignores .venv, so a copied archive never carries a local one), and the
# Python uv builds it with: one that jax and rtjax support.
VENV = ".venv"
PYTHON = f"{VENV}/bin/python"
PYTHON_VERSION = "3.12"

# Ends whatever holds the TPU (a crashed or stopped run: the processes with
# /dev/accel* (v4) or /dev/vfio/* (v5e and later) open), not a process name,
# so other programs on the VM live on. TERM first for a clean exit, KILL what
# still holds it after 10 s.
_HOLDERS = "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null"
STOP_SCRIPT = (
    f"{_HOLDERS} | xargs -r sudo kill -TERM; "
    f"for i in 1 2 3 4 5 6 7 8 9 10; do test -z \"$({_HOLDERS})\" && break; "
    f"sleep 1; done; {_HOLDERS} | xargs -r sudo kill -KILL; true")


def setup_script(remote_dir: str, git_url: str = "", git_ref: str = "") -> str:
  """Fetch the code (unpack the copied archive, or git), free a TPU held by an
  earlier run, build the venv and install rtjax[tpu] into it."""
  d = shlex.quote(remote_dir)
  steps = []
  if not git_url:
    steps.append(f"mkdir -p {d} && tar -xzf {ARCHIVE} -C {d}")
  else:
    steps.append(f"(test -d {d}/.git || git clone {shlex.quote(git_url)} {d})")
    steps.append(f"git -C {d} fetch --all --quiet")
    steps.append(f"git -C {d} checkout --quiet {shlex.quote(git_ref or 'main')}")
  python = shlex.quote(PYTHON)
  steps += [
      f"({STOP_SCRIPT})",
      "sudo rm -f /tmp/libtpu_lockfile",  # a killed run leaves libtpu's lock
      # uv into the user's site by the image's python3 (the variable only
      # matters on images whose pip refuses user installs, PEP 668).
      "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet "
      "--upgrade uv",
      f"cd {d}",
      f"python3 -m uv venv --quiet --clear --python "
      f"{shlex.quote(PYTHON_VERSION)} {shlex.quote(VENV)}",
      f"python3 -m uv pip install --quiet --python {python} -e "
      f"{shlex.quote('.[tpu]')}",
  ]
  return " && ".join(steps)


def run_script(remote_dir: str, main_args: Sequence[str]) -> str:
  """experiments.main on one worker, in the venv; JAX finds the other hosts
  itself."""
  args = " ".join(shlex.quote(a) for a in main_args)
  return (f"cd {shlex.quote(remote_dir)} && {shlex.quote(PYTHON)} -m "
          f"experiments.main --multihost {args}")


@dataclasses.dataclass
class LaunchPlan:
  tpu: TpuSpec
  main_args: list[str]
  create: bool = False
  delete_after: bool = False
  source_dir: str = "."
  remote_dir: str = "rtjax"
  git_url: str = ""
  git_ref: str = ""
  log_dir: str = "launch_logs"  # per-worker logs and the source archive

  @property
  def archive(self) -> str:
    return os.path.join(self.log_dir, ARCHIVE)

  @property
  def workers(self) -> int:
    return num_workers(self.tpu.accelerator_type)

  def commands(self) -> list[list[str]]:
    """Every command in order, as a dry run prints them (runs: per worker)."""
    out = []
    if self.create:
      out.append(create_command(self.tpu))
      wait = wait_ready_command(self.tpu)
      if wait:
        out.append(wait)
    if not self.git_url:
      out.append(copy_command(self.tpu, self.archive))
    out.append(ssh_command(self.tpu, "all", setup_script(
        self.remote_dir, self.git_url, self.git_ref)))
    for worker in range(self.workers):
      out.append(ssh_command(self.tpu, str(worker),
                             run_script(self.remote_dir, self.main_args)))
    if self.delete_after:
      out.append(delete_command(self.tpu))
    return out


class RemoteCommandError(RuntimeError):
  """A gcloud command or a worker's run failed: not a bad argument, so not a
  UserError; the launcher names it and exits with code 1."""


def _run(command: list[str], log: epath.Path | None = None) -> None:
  with (log.open("w") if log else open("/dev/null", "w")) as out:
    result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
  if result.returncode:
    raise RemoteCommandError(f"command failed with exit code "
                             f"{result.returncode}: {shlex.join(command)}")


def _wait_until_active(command: list[str], timeout_s: float,
                       poll_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    state = subprocess.run(command, capture_output=True, text=True).stdout.strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED") or time.monotonic() > deadline:
      raise RemoteCommandError(
          f"queued resource did not become ACTIVE (state {state!r})")
    time.sleep(poll_s)


def run_on_workers(plan: LaunchPlan, log_dir: epath.Path,
                   poll_s: float = 0.5) -> None:
  """One ssh per worker, each with its own log; the first failure stops the rest."""
  log_dir.mkdir(parents=True, exist_ok=True)
  procs = {}
  for worker in range(plan.workers):
    command = ssh_command(plan.tpu, str(worker),
                          run_script(plan.remote_dir, plan.main_args))
    log = (log_dir / f"worker-{worker}.log").open("w")
    procs[worker] = (subprocess.Popen(command, stdout=log,
                                      stderr=subprocess.STDOUT), log)
  failed = None
  try:
    while failed is None and any(p.poll() is None for p, _ in procs.values()):
      for worker, (proc, _) in procs.items():
        if proc.poll() not in (None, 0):
          failed = worker
          break
      time.sleep(poll_s)
    if failed is None:
      failed = next((w for w, (p, _) in procs.items() if p.returncode), None)
    if failed is not None:
      for proc, _ in procs.values():
        if proc.poll() is None:
          proc.terminate()
      # The remote processes outlive a killed ssh: stop them on every worker.
      subprocess.run(ssh_command(plan.tpu, "all", STOP_SCRIPT),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      raise RemoteCommandError(
          f"worker {failed} failed with exit code "
          f"{procs[failed][0].returncode}; stopped the other workers. Its log: "
          f"{log_dir / f'worker-{failed}.log'}")
  finally:
    for proc, log in procs.values():
      proc.wait()
      log.close()


def launch(plan: LaunchPlan, queued_timeout_s: float = 3600,
           poll_s: float = 10) -> None:
  """create -> copy -> set up -> run on all workers -> delete (also on failure)."""
  log_dir = epath.Path(plan.log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  try:
    if plan.create:
      _run(create_command(plan.tpu), log_dir / "create.log")
      wait = wait_ready_command(plan.tpu)
      if wait:
        _wait_until_active(wait, queued_timeout_s, poll_s)
    if not plan.git_url:
      package_source(plan.source_dir, plan.archive)
      _run(copy_command(plan.tpu, plan.archive), log_dir / "copy.log")
    _run(ssh_command(plan.tpu, "all", setup_script(
        plan.remote_dir, plan.git_url, plan.git_ref)), log_dir / "setup.log")
    run_on_workers(plan, log_dir)
  finally:
    if plan.delete_after:
      _run(delete_command(plan.tpu), log_dir / "delete.log")
