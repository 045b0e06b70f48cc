"""The orbax CheckpointManager of one run directory, with rtjax's metadata.

A run's checkpoints live in `<dir>/<step>/` with three items:
  model     the model's full state (params and BatchNorm stats) as a plain
            nested dict, readable by plain orbax without rtjax;
  opt_state the optax state, only needed to resume training;
  metadata  JSON: model name and constructor args, dataset, config, stage,
            parent, step, metrics (enough to rebuild the model alone) and the
            stamp of rtjax.checkpoint.stamp (schema, versions, content hash).
Orbax decides which steps are finished (a temporary directory locally, a
commit marker on gs://), when a step is due (save_interval_steps) and which
to keep. A newest step that cannot be restored is moved aside and the run
resumes from the newest intact one. A step that cannot be written for want of
space stops the run with one CheckpointWriteError; its temporary directory is
removed and the steps written before it stay.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from rtjax.checkpoint import stamp
from rtjax.errors import CheckpointError, RunError

ITEMS = ("model", "opt_state", "metadata")
# What reading a step's files may raise when they are missing, truncated or
# garbled: orbax and tensorstore raise plain Exceptions, json ValueErrors.
READ_ERRORS = (Exception,)


# What an exhausted disk or quota looks like in the errors orbax passes on:
# Python's OSError, or tensorstore's RESOURCE_EXHAUSTED ValueError that
# quotes the OS error.
OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
OUT_OF_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")


class CheckpointWriteError(RunError):
  """A step could not be written for want of space; the run stops there."""


def out_of_space(error: BaseException | None) -> bool:
  """True when `error`, or an error it was raised from, is a full disk."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE_ERRNOS:
      return True
    if any(text in str(error) for text in OUT_OF_SPACE_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


class _DropOrbaxOutOfSpace(std_logging.Filter):
  """Orbax logs a failed background write with its traceback from each
  thread it passes through; RunCheckpoints reports a full disk once, as a
  CheckpointWriteError, so those records are dropped (others are kept)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (out_of_space(error) or any(
        text in record.getMessage() for text in OUT_OF_SPACE_TEXTS))


_ORBAX_OUT_OF_SPACE = _DropOrbaxOutOfSpace()


def absolute(path: epath.PathLike) -> epath.Path:
  """Orbax wants absolute paths: resolve local ones, keep gs:// as given."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


class _Manager(ocp.CheckpointManager):
  """Orbax's manager without its own preemption check: jax's sync point
  must be asked once per iteration with one counter by the training loop
  alone (rtjax.train.preemption); orbax would also ask from save() and from
  its save-finishing thread with older steps, which can move one process's
  counter back and make the hosts disagree on the step."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def _abstract(tree, sharding=None):
  """Shapes and dtypes of `tree`, placed like it or with `sharding`."""
  if sharding is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=sharding), tree)


class RunCheckpoints:
  """Save, find and restore the steps of one checkpoint directory."""

  def __init__(self, directory: epath.PathLike, max_to_keep: int = 2,
               save_every: int | None = None, read_only: bool = False):
    self.directory = absolute(directory)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only,
        # The interval alone: the trainer decides about preemption itself
        # (see _Manager), and a step is due whether or not the previous save
        # is still being written.
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(
            save_every or 1),
        enable_should_save_is_saving_in_progress_check=False)
    self._manager = self._open()
    self._writing: int | None = None  # the step orbax may still be writing
    # absl's logger, which orbax logs through (adding it again is a no-op).
    std_logging.getLogger("absl").addFilter(_ORBAX_OUT_OF_SPACE)

  def _open(self) -> ocp.CheckpointManager:
    return _Manager(self.directory, options=self._options, item_names=ITEMS)

  def steps(self) -> list[int]:
    """Finished steps, oldest first (orbax's view: no temporary ones)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Due by the save interval (and not saved yet)."""
    return self._manager.should_save(step)

  def save(self, step: int, model_state: nnx.State, opt_state: Any,
           metadata: dict, host_arrays: bool = False) -> None:
    """Asynchronous: returns once arrays are copied off the device, after
    the previous step is written (a CheckpointWriteError names that step
    when the disk filled up while writing it).

    `host_arrays` saves the model as plain numpy arrays (no per-array
    sharding records): the lean form of serving-only checkpoints.
    """
    self.wait()
    model = nnx.to_pure_dict(model_state)
    if host_arrays:
      model = jax.device_get(model)
    items = {"model": ocp.args.StandardSave(model),
             "metadata": ocp.args.JsonSave({**metadata, **stamp.stamp(model)})}
    if opt_state is not None:  # serving-only checkpoints (int8) have none
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 (only a full disk is handled)
      self._raise_if_out_of_space(step, e)
      raise
    self._writing = step

  def metadata(self, step: int) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    metadata = dict(restored.metadata)
    stamp.check_schema(metadata, self.directory / str(step))
    return metadata

  def restore(self, step: int, model_state: nnx.State, opt_state: Any,
              sharding: jax.sharding.Sharding | None = None
              ) -> tuple[nnx.State, Any]:
    """Restores into the structure of the given templates, placed like them
    or with `sharding` (a multi-process run's global, replicated arrays),
    checking the content hash the step recorded."""
    metadata = self.metadata(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(
            _abstract(nnx.to_pure_dict(model_state), sharding)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state, sharding))))
    stamp.check_digest(metadata, restored.model, self.directory / str(step))
    nnx.replace_by_pure_dict(model_state, restored.model)
    return model_state, restored.opt_state

  def restore_latest(self, model_state: nnx.State, opt_state: Any,
                     check: Callable[[dict], None] = lambda metadata: None,
                     sharding: jax.sharding.Sharding | None = None
                     ) -> tuple[int, nnx.State, Any]:
    """(step, model state, opt state) of the newest intact step, or step 0
    and the templates when there is none yet.

    `check(metadata)` may refuse a step for the user's reasons (another
    architecture): its error propagates. A step that cannot be read is
    damaged: all processes agree on it, process 0 moves it aside under a name
    orbax does not read as a step, and the next older one is tried.
    """
    damaged = []
    for step in reversed(self.steps()):
      error = state = opt = None
      try:
        metadata = self.metadata(step)
      except CheckpointError:
        raise  # readable, but from a newer rtjax: not damage
      except READ_ERRORS as e:
        metadata, error = None, e
      if metadata is not None:
        check(metadata)  # a user error (another architecture) propagates
        try:
          state, opt = self.restore(step, model_state, opt_state, sharding)
        except READ_ERRORS as e:  # includes a content-hash mismatch
          error = e
      if _everywhere(error is None):
        return step, state, opt
      reason = _reason(error) if error else "unreadable on another process"
      damaged.append(f"step {step} ({reason})")
      logging.warning("checkpoint step %d in %s is damaged: %s", step,
                      self.directory, reason)
      self._move_aside(step)
    if damaged:
      raise CheckpointError(
          f"no intact checkpoint in {self.directory}: {'; '.join(damaged)} "
          "(moved aside as damaged-step-*). Restore them from a copy, or "
          "use a new --workdir to start over")
    return 0, model_state, opt_state

  def _move_aside(self, step: int) -> None:
    self._manager.close()
    if jax.process_index() == 0:
      target = self.directory / f"damaged-step-{step}-{int(time.time())}"
      (self.directory / str(step)).rename(target)
      logging.warning("moved damaged step %d to %s; resuming from the newest "
                      "intact step", step, target)
    _barrier(f"rtjax_moved_aside_{step}")
    self._manager = self._open()

  def wait(self) -> None:
    """Until the step being written is finished; a CheckpointWriteError
    when the disk filled up while writing it."""
    step, self._writing = self._writing, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (only a full disk is handled)
      if step is not None:
        self._raise_if_out_of_space(step, e)
      raise

  def _raise_if_out_of_space(self, step: int, error: BaseException) -> None:
    """For a full disk: the unfinished step's temporary directory removed,
    a fresh manager (orbax's keeps re-raising the failure), and one
    CheckpointWriteError that says what was kept and how to go on."""
    if not out_of_space(error):
      return
    _join_orbax_writers()
    if jax.process_index() == 0:
      suffix = ocp.path.atomicity.TMP_DIR_SUFFIX
      for partial in self.directory.glob(f"{step}{suffix}*"):
        partial.rmtree()
    self._manager = self._open()
    kept = self.steps()
    resume = (f"it resumes from step {kept[-1]}, the newest intact one"
              if kept else "no step was written, so it starts from step 0")
    raise CheckpointWriteError(
        f"checkpoint step {step} could not be written to {self.directory}: "
        f"no space left on device (its partial files were removed). Free "
        f"some space and rerun the same command: {resume}") from None

  def close(self) -> None:
    """Waits for the step being written (see wait), then closes."""
    try:
      self.wait()
    finally:
      self._manager.close()


def _join_orbax_writers(timeout_s: float = 60.0) -> None:
  """Orbax writes a step's items in threads of their own and stops waiting
  at the first failure, while the others go on writing into the step's
  temporary directory (its `_sharding` file, after a removal): removing the
  directory is final only once they have ended."""
  from orbax.checkpoint._src.futures import future  # no public handle
  writer = getattr(future, "_SignalingThread", None)
  for thread in threading.enumerate():
    if (writer and isinstance(thread, writer)
        and thread is not threading.current_thread()):
      threading.Thread.join(thread, timeout_s)  # its own join re-raises


def _reason(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}"


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process (one small collective)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
