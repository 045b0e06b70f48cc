"""Orbax checkpoints that carry their own metadata.

A run's checkpoints live in `<workdir>/checkpoints/<step>/` with three items:
  model     the model's full state (params and BatchNorm stats) as a plain
            nested dict, readable by plain orbax without rtjax;
  opt_state the optax state, only needed to resume training;
  metadata  JSON: model name and constructor args, dataset, config, stage,
            parent, step, metrics; enough to rebuild the model alone.
Orbax writes each step to a temporary directory and renames it when complete,
so a crash never leaves a step directory that looks finished.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtjax.models import abstract_model, create_model

ITEMS = ("model", "opt_state", "metadata")
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
  """A path is not a usable checkpoint; the message says which and why."""


def absolute(path: epath.PathLike) -> epath.Path:
  """Orbax wants absolute paths: resolve local ones, keep gs:// as given."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


class RunCheckpoints:
  """The CheckpointManager of one run directory."""

  def __init__(self, directory: epath.PathLike, max_to_keep: int = 2):
    self.directory = absolute(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, model_state: nnx.State, opt_state: Any,
           metadata: dict, host_arrays: bool = False) -> None:
    """Asynchronous: returns once arrays are copied off the device.

    `host_arrays` saves the model as plain numpy arrays (no per-array
    sharding records): the lean form of serving-only checkpoints.
    """
    model = nnx.to_pure_dict(model_state)
    if host_arrays:
      model = jax.device_get(model)
    items = {"model": ocp.args.StandardSave(model),
             "metadata": ocp.args.JsonSave(metadata)}
    if opt_state is not None:  # serving-only checkpoints (int8) have none
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def metadata(self, step: int) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(restored.metadata)

  def restore(self, step: int, model_state: nnx.State,
              opt_state: Any) -> tuple[nnx.State, Any]:
    """Restores into the structure (and shardings) of the given templates."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(
            abstract(nnx.to_pure_dict(model_state))),
        opt_state=ocp.args.StandardRestore(abstract(opt_state))))
    nnx.replace_by_pure_dict(model_state, restored.model)
    return model_state, restored.opt_state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def model_from_spec(spec: dict) -> nnx.Module:
  """The model a checkpoint's metadata['model'] describes, weights not loaded.

  Float models are built abstract (shapes only); quantized ones are wrapped by
  qwix exactly as when they were saved.
  """
  if not spec.get("quantization"):
    return abstract_model(spec["name"], spec["args"])
  from rtjax.compress.quantize import rebuild  # only quantized checkpoints
  return rebuild(create_model(spec["name"], spec["args"]),
                 spec["quantization"], spec["args"]["input_shape"])


def _resolve(path: epath.PathLike) -> tuple[epath.Path, int]:
  """(manager directory, step) for a workdir, a checkpoints dir or a step dir."""
  path = absolute(path)
  if TMP_MARKER in path.name:
    raise CheckpointError(
        f"{path} is a half-written (temporary) orbax checkpoint: its save "
        "never finished. Use a finished step directory or the run's workdir.")
  if not path.exists():
    raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
  if (path / "metadata").exists() and path.name.isdigit():
    return path.parent, int(path.name)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()
                 and (p / "metadata").exists())
  if not steps:
    raise CheckpointError(
        f"{path} holds no finished rtjax checkpoint (expected step "
        "directories with model/ and metadata/ items, or a workdir with "
        "checkpoints/)")
  return path, steps[-1]


def model_bytes(path: epath.PathLike) -> int:
  """Bytes on disk of a checkpoint's model item (what serving loads); `path`
  as for load_checkpoint (workdir, checkpoints/ or a step directory)."""
  directory, step = _resolve(path)
  return sum((root / name).stat().length
             for root, _, files in (directory / str(step) / "model").walk()
             for name in files)


def load_checkpoint(path: epath.PathLike) -> tuple[nnx.Module, dict]:
  """Rebuilds a model from a checkpoint alone: (model in its saved state, metadata).

  `path` may be a run's workdir, its checkpoints/ directory (latest step is
  used) or one step directory.
  """
  directory, step = _resolve(path)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_names=ITEMS)
  try:
    metadata = dict(manager.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore())).metadata)
    model = model_from_spec(metadata["model"])
    state = nnx.state(model)
    # Replicated on every current device (of every process), whatever mesh
    # wrote the checkpoint; serving re-shards from there.
    replicated = NamedSharding(Mesh(jax.devices(), ("all",)), PartitionSpec())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        nnx.to_pure_dict(state))
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))
  except (KeyError, ValueError, FileNotFoundError) as e:
    raise CheckpointError(
        f"checkpoint {directory / str(step)} cannot be restored ({e}); it may "
        "be truncated or written by another architecture") from e
  finally:
    manager.close()
  nnx.replace_by_pure_dict(state, restored.model)
  nnx.update(model, state)
  return model, metadata
