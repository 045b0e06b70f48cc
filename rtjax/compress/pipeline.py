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

from rtjax import models
from rtjax.compress import pruning, quantize, structured
from rtjax.data import Dataset, eval_batches
from rtjax.models.stats import layer_stats
from rtjax.train.checkpointing import (RunCheckpoints, load_checkpoint,
                                       model_bytes)
from rtjax.train.evaluate import evaluate
from rtjax.train.trainer import (Stage, Teacher, TrainResult, model_args_for,
                                 model_size, stage_metadata, train_stage)


def stage_train_config(config, section):
  """config.train with the stage's overrides."""
  train = config.train.copy_and_resolve_references()
  with train.unlocked():
    train.update(section.get("train", {}))
  return train


def _spec_for(model_section, dataset: Dataset) -> dict:
  args = {**model_section.get("args", {}), "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape)}
  return {"name": model_section.name, "args": json.loads(json.dumps(args))}


def _float_copy(model: nnx.Module, spec: dict) -> nnx.Module:
  """The plain float model under a (possibly QAT-wrapped) one."""
  plain = models.create_model(spec["name"], spec["args"])
  state = nnx.state(plain)
  nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model)))
  nnx.update(plain, state)
  return plain


def _build_stage(config, name: str, section, parent_dir, dataset: Dataset,
                 train_cfg) -> Stage:
  kind = section.type
  parent_path = str(parent_dir) if parent_dir else None
  if kind == "train":
    spec = (_spec_for(section.model, dataset) if section.model else
            {"name": config.model.name, "args": model_args_for(config, dataset)})
    return Stage(models.create_model(spec["name"], spec["args"], config.seed),
                 spec, name, kind)

  parent, parent_meta = load_checkpoint(parent_dir)
  parent_spec = parent_meta["model"]
  if kind == "prune":
    end = section.end_step or int(0.75 * train_cfg.num_steps)
    prunable = lambda p: pruning.prunable_tree(p, section.include,
                                               section.exclude)
    if section.method == "magnitude":
      mask_fn = lambda p, pr, step: pruning.magnitude_masks(
          p, pr, pruning.polynomial_sparsity(
              step, section.initial_sparsity, section.target_sparsity,
              section.begin_step, end), section.scope)
      begin, every = section.begin_step, section.update_every
    else:  # N:M: one mask at the first step, kept from then on
      mask_fn = lambda p, pr, step: pruning.n_m_masks(p, pr, section.n,
                                                      section.m)
      begin, every, end = 1, 1, 1
    wrap = lambda tx: pruning.pruned(tx, prunable, mask_fn, every, begin, end)
    done = {"method": section.method, "target_sparsity": section.target_sparsity,
            "scope": section.scope, "exclude": section.exclude,
            "n_m": [section.n, section.m], "schedule_steps": [begin, end, every]}
    return Stage(parent, parent_spec, name, kind, parent_path,
                 wrap_optimizer=wrap, done=done)

  if kind == "structured_prune":
    smaller, args, summary = structured.shrink(
        parent, parent_spec["name"], parent_spec["args"], section.keep_fraction,
        section.criterion, section.round_to, section.groups)
    shape = dataset.input_shape
    done = {"keep_fraction": section.keep_fraction,
            "criterion": section.criterion, "round_to": section.round_to,
            "groups": summary,
            "flops_before": models.forward_flops(parent, shape),
            "flops_after": models.forward_flops(smaller, shape)}
    return Stage(smaller, {"name": parent_spec["name"], "args": args}, name,
                 kind, parent_path, done=done)

  if kind == "distill":
    spec = _spec_for(section.model, dataset)
    student = models.create_model(spec["name"], spec["args"], config.seed)
    done = {"alpha": section.alpha, "temperature": section.temperature,
            "teacher_flops": models.forward_flops(parent, dataset.input_shape)}
    return Stage(student, spec, name, kind, parent_path,
                 teacher=Teacher(parent, section.alpha, section.temperature),
                 done=done)

  if kind == "qat":
    qspec = quantize.quantization_spec(section.scheme, section.module_path,
                                       mode="qat")
    model = quantize.qat_model(_float_copy(parent, parent_spec), qspec,
                               dataset.input_shape)
    return Stage(model, {**parent_spec, "quantization": qspec}, name, kind,
                 parent_path, done={"quantization": qspec})
  raise ValueError(f"unknown stage type {kind!r}")


def _convert_int8(config, name: str, section, parent_dir, stage_dir,
                  dataset: Dataset) -> TrainResult:
  """Float or QAT parent -> int8 serving checkpoint (values + scales)."""
  parent, parent_meta = load_checkpoint(parent_dir)
  parent_spec = {k: v for k, v in parent_meta["model"].items()
                 if k != "quantization"}
  inherited = (parent_meta["model"].get("quantization") or {}).get("scheme")
  qspec = quantize.quantization_spec(section.scheme or inherited or "w8a8",
                                     section.module_path,
                                     section.static_activations, mode="ptq")
  float_model = _float_copy(parent, parent_spec)
  stats = None
  if section.static_activations:
    batches = [images for images, _, _ in eval_batches(
        dataset.train, config.train.eval_batch_size)][
            :section.calibration_batches]
    stats = quantize.calibrate(float_model, qspec, dataset.input_shape,
                               batches)
  model = quantize.int8_model(float_model, qspec, dataset.input_shape, stats)
  batch = config.train.eval_batch_size
  metrics = {"val": evaluate(model, dataset.val, batch),
             "test": evaluate(model, dataset.test, batch)}
  stage = Stage(model, {**parent_spec, "quantization": qspec}, name, "int8",
                str(parent_dir), done={"quantization": qspec,
                                       "calibrated": bool(stats)})
  checkpoints = RunCheckpoints(stage_dir / "checkpoints", 1)
  size = model_size(model, dataset.input_shape)
  checkpoints.save(0, nnx.state(model), None, stage_metadata(
      config, stage, dataset, 0, metrics, size, complete=True),
                   host_arrays=True)
  checkpoints.wait()
  checkpoints.close()
  return TrainResult(step=0, preempted=False, metrics=metrics,
                     checkpoint_dir=checkpoints.directory)


def write_report(stage_dir: epath.Path, parent_dir, dataset: Dataset) -> dict:
  """Per-layer parameters, zeros and FLOPs of the stage and of its parent."""
  model, metadata = load_checkpoint(stage_dir)
  report = {"stage": metadata["stage"], "type": metadata["stage_type"],
            "parent": metadata["parent"], "done": metadata["done"],
            "metrics": metadata["metrics"], "param_count": metadata["param_count"],
            "flops_per_example": metadata["flops_per_example"],
            "checkpoint_bytes": model_bytes(stage_dir)}
  quantized = bool(metadata["model"].get("quantization"))
  if not quantized:
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


def _finished(stage_dir: epath.Path) -> dict | None:
  checkpoints = stage_dir / "checkpoints"
  if not checkpoints.exists():
    return None
  manager = RunCheckpoints(checkpoints)
  try:
    step = manager.latest_step()
    metadata = manager.metadata(step) if step is not None else None
  finally:
    manager.close()
  return metadata if metadata and metadata.get("complete") else None


def run_pipeline(config, workdir, dataset: Dataset) -> dict[str, TrainResult]:
  workdir = epath.Path(workdir)
  results, previous = {}, None
  for name in config.stages:
    section = config.stage[name]
    parent = section.parent or (previous if section.type != "train" else "")
    parent_dir = workdir / parent if parent else None
    stage_dir = workdir / name
    previous = name
    finished = _finished(stage_dir)
    if finished:
      logging.info("stage %s already finished (step %d); skipping", name,
                   finished["step"])
      results[name] = TrainResult(finished["step"], False, finished["metrics"],
                                  stage_dir / "checkpoints")
      continue
    if section.type == "int8":
      results[name] = _convert_int8(config, name, section, parent_dir,
                                    stage_dir, dataset)
    else:
      train_cfg = stage_train_config(config, section)
      stage = _build_stage(config, name, section, parent_dir, dataset,
                           train_cfg)
      results[name] = train_stage(config, train_cfg, stage_dir, dataset, stage)
      if results[name].preempted:
        return results
    report = write_report(stage_dir, parent_dir, dataset)
    logging.info("stage %s: test accuracy %.4f, %.3g FLOPs, %d bytes", name,
                 report["metrics"]["test"]["accuracy"],
                 report["flops_per_example"], report["checkpoint_bytes"])
  return results
