"""Where a measured table came from, stamped at its top: the command, date,
git commit, CPU, package versions and XLA flags, so a number in
experiments/results/ can be traced and rerun."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

import jax
from etils import epath

from rtjax.checkpoint.stamp import versions


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return "unknown (no git)"
  commit = out.stdout.strip() or "unknown (not a git checkout)"
  return commit + (" with uncommitted changes" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
  except OSError:
    pass
  return f"{platform.processor() or platform.machine()} x {os.cpu_count()}"


def header(command: list[str] | None = None) -> str:
  """Markdown lines naming how and where the table below was measured."""
  command = command or [os.path.basename(sys.executable), *sys.argv]
  if command[1:2] and command[1].endswith(".py") and "experiments" in command[1]:
    module = command[1].split("experiments" + os.sep)[-1][:-3]
    command = [command[0], "-m", f"experiments.{module}", *command[2:]]
  packages = ", ".join(f"{k} {v}" for k, v in versions().items())
  device = jax.devices()[0]
  return "\n".join([
      f"Command: `{shlex.join(command)}`  ",
      f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
      f"; git commit: {_git_commit()}  ",
      f"Machine: {_cpu_model()}; devices: {jax.device_count()} x "
      f"{device.device_kind} ({device.platform})  ",
      f"Packages: Python {platform.python_version()}, {packages}  ",
      f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`", "", ""])


NOTES = "\n## Notes\n"


def write_results(path: epath.PathLike, markdown: str) -> epath.Path:
  """`markdown` under its provenance header, at `path` (experiments/results).
  A `## Notes` section closing the file it replaces is kept at the end: it
  holds what earlier runs of the command measured, which a rerun must not
  erase."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  old = path.read_text() if path.exists() else ""
  notes = old[old.index(NOTES):] if NOTES in old else ""
  path.write_text(header() + markdown.rstrip("\n") + "\n" + notes)
  return path
