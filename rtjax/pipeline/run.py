"""The compression pipeline: stages in config order, each starting from its
parent's checkpoint and writing its own (`<workdir>/<stage>/checkpoints`) with
lineage in the metadata, plus `<workdir>/<stage>/report.json` (per-layer
parameters, zeros and FLOPs before and after). Rerunning the same workdir
skips finished stages and resumes an unfinished one.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from rtjax import config as config_lib
from rtjax.checkpoint import finished_stage, load_checkpoint, model_bytes
from rtjax.data import Dataset, load_dataset
from rtjax.models.stats import layer_stats
from rtjax.pipeline import registry
from rtjax.train import TrainResult


def validate(config) -> None:
  """The whole config: its common keys, then each stage section."""
  config_lib.validate(config)
  registry.validate_stages(config, config_lib.base_config().train)


def stage_train_config(config, section):
  """config.train with the stage's overrides."""
  train = config.train.copy_and_resolve_references()
  with train.unlocked():
    train.update(section.get("train", {}))
  return train


def write_report(stage_dir: epath.Path, parent_dir, dataset: Dataset) -> dict:
  """Per-layer parameters, zeros and FLOPs of the stage and of its parent."""
  model, metadata = load_checkpoint(stage_dir)
  report = {"stage": metadata["stage"], "type": metadata["stage_type"],
            "parent": metadata["parent"], "done": metadata["done"],
            "metrics": metadata["metrics"], "param_count": metadata["param_count"],
            "flops_per_example": metadata["flops_per_example"],
            "checkpoint_bytes": model_bytes(stage_dir)}
  if not metadata["model"].get("quantization"):
    report["layers"] = layer_stats(model, dataset.input_shape)
    report["nonzero_params"] = int(sum(
        np.count_nonzero(np.asarray(x))
        for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  if parent_dir:
    parent, parent_meta = load_checkpoint(parent_dir)
    report["parent_checkpoint_bytes"] = model_bytes(parent_dir)
    report["parent_flops_per_example"] = parent_meta["flops_per_example"]
    report["parent_metrics"] = parent_meta["metrics"]
    if not parent_meta["model"].get("quantization"):
      report["parent_layers"] = layer_stats(parent, dataset.input_shape)
  if jax.process_index() == 0:
    (stage_dir / "report.json").write_text(json.dumps(report, indent=1))
  return report


def run_pipeline(config, workdir) -> dict[str, TrainResult]:
  """Validates the config, then runs (or skips, when finished) each stage."""
  validate(config)
  dataset = load_dataset(config.data, config.seed)
  workdir = epath.Path(workdir)
  results, previous = {}, None
  for name in config.stages:
    section = config.stage[name]
    kind = registry.stage_type(section.type)
    parent = section.parent or (previous if kind.needs_parent else "")
    parent_dir = workdir / parent if parent else None
    stage_dir = workdir / name
    previous = name
    finished = finished_stage(stage_dir)
    if finished:
      logging.info("stage %s already finished (step %d); skipping", name,
                   finished["step"])
      results[name] = TrainResult(finished["step"], False, finished["metrics"],
                                  stage_dir / "checkpoints")
      continue
    results[name] = kind.run(registry.Context(
        config, name, section, stage_train_config(config, section),
        parent_dir, stage_dir, dataset))
    if results[name].preempted:
      return results
    report = write_report(stage_dir, parent_dir, dataset)
    logging.info("stage %s: test accuracy %.4f, %.3g FLOPs, %d bytes", name,
                 report["metrics"]["test"]["accuracy"],
                 report["flops_per_example"], report["checkpoint_bytes"])
  return results
