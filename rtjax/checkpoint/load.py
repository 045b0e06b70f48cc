"""Everything a checkpoint path alone must rebuild: the model (from its
metadata's spec, weights restored), its bytes on disk and its dataset."""

from __future__ import annotations

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtjax.checkpoint import stamp
from rtjax.checkpoint.store import ITEMS, READ_ERRORS, absolute
from rtjax.data import Dataset, dataset_spec, load_dataset
from rtjax.errors import CheckpointError, ConfigError
from rtjax.models import abstract_model, create_model
from rtjax.models.quantized import rebuild


def model_from_spec(spec: dict) -> nnx.Module:
  """The model a checkpoint's metadata['model'] describes, weights not loaded.

  Float models are built abstract (shapes only); quantized ones are wrapped by
  qwix exactly as when they were saved.
  """
  if not spec.get("quantization"):
    return abstract_model(spec["name"], spec["args"])
  return rebuild(create_model(spec["name"], spec["args"]),
                 spec["quantization"], spec["args"]["input_shape"])


def _manager(directory: epath.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_names=ITEMS)


def _finished_steps(directory: epath.Path) -> list[int]:
  manager = _manager(directory)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def run_name(path: epath.PathLike) -> str:
  """The run's name (its workdir's) for a workdir, its checkpoints/ or one
  step: what the server calls the model and a client asks for."""
  return resolve(path)[0].parent.name


def resolve(path: epath.PathLike) -> tuple[epath.Path, int]:
  """(checkpoints directory, step) for a workdir, its checkpoints/ directory
  (the newest finished step) or one step directory."""
  path = absolute(path)
  if not path.exists():
    raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
  if path.name.isdigit() and int(path.name) in _finished_steps(path.parent):
    return path.parent, int(path.name)
  if ".orbax-checkpoint-tmp" in path.name:
    raise CheckpointError(
        f"{path} is a half-written (temporary) orbax checkpoint: its save "
        "never finished. Use a finished step directory or the run's workdir.")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  steps = _finished_steps(path) if path.is_dir() else []
  if not steps:
    raise CheckpointError(
        f"{path} holds no finished rtjax checkpoint (expected a run's "
        "workdir, its checkpoints/ directory or one of its step directories)")
  return path, steps[-1]


def model_bytes(path: epath.PathLike) -> int:
  """Bytes on disk of a checkpoint's model item (what serving loads); `path`
  as for load_checkpoint (workdir, checkpoints/ or a step directory)."""
  directory, step = resolve(path)
  return sum((root / name).stat().length
             for root, _, files in (directory / str(step) / "model").walk()
             for name in files)


def load_checkpoint(path: epath.PathLike) -> tuple[nnx.Module, dict]:
  """Rebuilds a model from a checkpoint alone: (model in its saved state, metadata).

  `path` may be a run's workdir, its checkpoints/ directory (latest step is
  used) or one step directory. A damaged, corrupted or newer-schema
  checkpoint is a CheckpointError naming the step; nothing is changed.
  """
  directory, step = resolve(path)
  where = directory / str(step)
  manager = _manager(directory)
  try:
    metadata = dict(manager.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore())).metadata)
    stamp.check_schema(metadata, where)
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
    stamp.check_digest(metadata, restored.model, where)
  except CheckpointError:
    raise
  except READ_ERRORS as e:
    raise CheckpointError(
        f"checkpoint {where} cannot be restored ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:300]}); it may be truncated or written "
        "by another architecture") from e
  finally:
    manager.close()
  nnx.replace_by_pure_dict(state, restored.model)
  nnx.update(model, state)
  return model, metadata


def checkpoint_dataset(metadata: dict, data_overrides: dict | None = None
                       ) -> Dataset:
  """The dataset (and split seed) a checkpoint was trained on, optionally
  with config.data keys replaced (e.g. a new data.dir on another machine);
  one the model cannot take is refused before any data is read."""
  config = ml_collections.ConfigDict(metadata["config"])
  if data_overrides:
    with config.unlocked():
      config.data.update(data_overrides)
  spec, args = dataset_spec(config.data), metadata["model"]["args"]
  if ((tuple(spec.input_shape), spec.num_classes)
      != (tuple(args["input_shape"]), args["num_classes"])):
    raise ConfigError(
        f"data.name: {spec.name} gives {spec.input_shape} inputs with "
        f"{spec.num_classes} classes, but the checkpoint's model takes "
        f"{tuple(args['input_shape'])} with {args['num_classes']}")
  return load_dataset(config.data, config.seed)


def describe(path: epath.PathLike) -> dict:
  """A checkpoint's lineage, metrics, versions and serving options, each
  parent read from its own checkpoint (for experiments.inspect)."""
  model, metadata = load_checkpoint(path)
  lineage, parent = [], metadata.get("parent")
  while parent:
    try:
      parent_meta = load_checkpoint(parent)[1]
    except CheckpointError as e:
      lineage.append(f"{parent} (unreadable: {e})")
      break
    lineage.append(f"{parent_meta.get('stage')} ({parent_meta.get('stage_type')}"
                   f", {parent})")
    parent = parent_meta.get("parent")
  directory, step = resolve(path)
  return {
      "checkpoint": str(directory / str(step)),
      "stage": f"{metadata.get('stage')} ({metadata.get('stage_type')})",
      "lineage": " <- ".join(lineage) or "none (trained from scratch)",
      "done": metadata.get("done"),
      "model": metadata["model"],
      "params": metadata.get("param_count"),
      "flops_per_example": metadata.get("flops_per_example"),
      "bytes": model_bytes(path),
      "dataset": metadata.get("dataset"),
      "step": f"{metadata.get('step')} (complete: {metadata.get('complete')})",
      "metrics": metadata.get("metrics"),
      "schema_version": metadata.get("schema_version", 1),
      "versions": metadata.get("versions", "not recorded (schema 1)"),
      "device_kind": metadata.get("device_kind", "not recorded"),
      "params_sha256": metadata.get("params_sha256", "not recorded"),
      "serving": metadata.get("serving", "none recorded: rtjax defaults"),
  }
