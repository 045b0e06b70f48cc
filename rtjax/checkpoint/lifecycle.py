"""A stage's checkpoints from its consumers' side: whether a stage already
finished (so a rerun skips it) and writing a stage that is one complete step
(a serving-only checkpoint: int8, the optimizer's chosen model). A damaged
step is moved aside by RunCheckpoints.restore_latest (rtjax.checkpoint.store)
and nowhere else.
"""

from __future__ import annotations

from etils import epath
from flax import nnx

from rtjax.checkpoint.store import RunCheckpoints
from rtjax.errors import CheckpointError


def finished_stage(stage_dir: epath.PathLike) -> dict | None:
  """The metadata of a stage's last step when that step completed it; None
  when the stage has not started, is unfinished or its newest step cannot
  be read (the stage resumes, and handles that, when it runs)."""
  stage_dir = epath.Path(stage_dir)
  if not (stage_dir / "checkpoints").exists():
    return None
  checkpoints = RunCheckpoints(stage_dir / "checkpoints", read_only=True)
  try:
    step = checkpoints.latest_step()
    metadata = checkpoints.metadata(step) if step is not None else None
  except CheckpointError:
    raise  # readable, but from a newer rtjax: not damage
  except (ValueError, OSError):
    return None
  finally:
    checkpoints.close()
  return metadata if metadata and metadata.get("complete") else None


def save_complete_step(model: nnx.Module, metadata: dict,
                       stage_dir: epath.PathLike) -> epath.Path:
  """Writes `model` as step 0 of `<stage_dir>/checkpoints`, complete (a
  rerun skips the stage), host arrays and no optimizer state; returns that
  checkpoints directory once the step is on disk."""
  checkpoints = RunCheckpoints(epath.Path(stage_dir) / "checkpoints", 1)
  try:
    checkpoints.save(0, nnx.state(model), None,
                     {**metadata, "step": 0, "complete": True},
                     host_arrays=True)
  finally:
    checkpoints.close()  # waits until the step is on disk
  return checkpoints.directory
