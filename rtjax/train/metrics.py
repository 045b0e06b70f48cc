"""Training metrics: a window of steps averaged on device (nnx.MultiMetric),
written to JSON lines (for scripts) and TensorBoard event files (for people)."""

from __future__ import annotations

import json
import time

from etils import epath
from flax import nnx
import jax
from tensorboardX import SummaryWriter


class TrainMetrics:
  """Loss, gradient norm and accuracy averaged over the steps since the last
  reset; the state lives on device (train_step updates it), so reading it
  is the window's one host sync."""

  NAMES = ("loss", "grad_norm", "accuracy")

  def __init__(self, sharding=None):
    self.graphdef, self._empty = nnx.split(nnx.MultiMetric(
        **{name: nnx.metrics.Average(name) for name in self.NAMES}))
    if sharding is not None:  # where train_step returns it: one program
      self._empty = jax.device_put(self._empty, sharding)
    self.reset()

  def reset(self) -> None:
    self.state, self.steps, self.start = self._empty, 0, time.perf_counter()

  def compute(self) -> dict[str, float]:
    """Window means and steps_per_sec, as host floats."""
    means = nnx.merge(self.graphdef, self.state).compute()
    out = {name: float(value) for name, value in means.items()}
    out["steps_per_sec"] = self.steps / max(time.perf_counter() - self.start,
                                            1e-9)
    return out


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
    if self._tensorboard is None:
      return
    try:
      self._tensorboard.close()
    except OSError:  # a full disk: its bytes cannot be written now or at exit
      for writer in self._tensorboard.all_writers.values():
        writer.event_writer._closed = True  # noqa: SLF001 (tensorboardX's exit hook retries otherwise)
      raise


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
