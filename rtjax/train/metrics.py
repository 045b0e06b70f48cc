"""Metrics to JSON lines (for scripts) and TensorBoard event files (for people)."""

from __future__ import annotations

import json
import time

from etils import epath
from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends `{"step", "split", ...metrics}` to metrics.jsonl and scalars to
  tensorboard/; only process 0 of a multi-host run should write."""

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tensorboard = (SummaryWriter(str(workdir / "tensorboard"))
                         if enabled else None)

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, "split": split, "time": time.time(), **metrics}
    append_line(self.path, json.dumps(record))
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def append_line(path: epath.Path, line: str, rewrite: bool | None = None) -> None:
  """Appends one line. Object stores (gs://) cannot append: there the file
  is rewritten whole, which is cheap for a metrics log."""
  if rewrite is None:
    rewrite = "://" in str(path)
  if not rewrite:
    with path.open("a") as f:
      f.write(line + "\n")
    return
  old = path.read_text() if path.exists() else ""
  path.write_text(old + line + "\n")


def read_metrics(workdir) -> list[dict]:
  """All records of a run's metrics.jsonl, in write order."""
  path = epath.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line]
