"""Training stage: config -> trained, evaluated, checkpointed model.

Reads top to bottom: data, model, optimizer, resume, jitted steps, the loop
(log, evaluate, checkpoint, preemption, NaN guard), final test evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import rtjax
from rtjax import config as config_lib
from rtjax import models
from rtjax.data import Dataset, Split, TrainBatches, load_dataset
from rtjax.train.checkpointing import RunCheckpoints
from rtjax.train.evaluate import evaluate
from rtjax.train.metrics import MetricWriter
from rtjax.train.optim import make_optimizer
from rtjax.train.preemption import PreemptionGuard


class NonFiniteLossError(RuntimeError):
  """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  step: int
  preempted: bool
  metrics: dict[str, dict[str, float]]  # split -> metric -> value
  checkpoint_dir: epath.Path


def model_args_for(config, dataset: Dataset) -> dict:
  """The family's full constructor arguments: config's plus the dataset's,
  in their JSON form (lists, not tuples) as the checkpoint metadata holds them."""
  args = {**config.model.args.to_dict(), "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape)}
  return json.loads(json.dumps(args))


def _check_same_model(saved: dict, spec: dict, directory) -> None:
  if saved["model"] != spec:
    raise config_lib.ConfigError(
        f"{directory} holds checkpoints of model {saved['model']}, but this "
        f"run builds {spec}. Use a new --workdir, or the config that wrote "
        "this run.")


def _loss(logits, labels, num_classes: int, label_smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


@dataclasses.dataclass
class Teacher:
  """Distillation: a frozen model whose softened logits the student matches."""
  model: nnx.Module
  alpha: float
  temperature: float


@dataclasses.dataclass
class Stage:
  """What one training stage starts from and how it differs from plain training.

  `spec` rebuilds the model from the checkpoint alone ({'name', 'args'} and,
  for quantized models, 'quantization'); `wrap_optimizer` adds e.g. pruning
  masks around the config's optax optimizer; `done` records what the stage
  did (lineage metadata)."""
  model: nnx.Module
  spec: dict
  name: str = "train"
  type: str = "train"
  parent: str | None = None
  wrap_optimizer: Callable[[optax.GradientTransformation],
                           optax.GradientTransformation] = lambda tx: tx
  teacher: Teacher | None = None
  done: dict = dataclasses.field(default_factory=dict)


def model_size(model: nnx.Module, input_shape) -> dict:
  return {"param_count": models.param_count(model),
          "flops_per_example": models.forward_flops(model, input_shape)}


def stage_metadata(config, stage: Stage, dataset: Dataset, step: int,
                   metrics: dict, size: dict, complete: bool) -> dict:
  """The metadata every checkpoint carries (see checkpointing.py)."""
  return {
      "rtjax_version": rtjax.__version__,
      "stage": stage.name,
      "stage_type": stage.type,
      "parent": stage.parent,
      "done": stage.done,
      "model": stage.spec,
      "dataset": dataset.describe(),
      "config": config.to_dict(),
      "step": step,
      "complete": complete,  # the stage's last step: a rerun skips it
      **size,
      "metrics": metrics,
  }


def train_and_evaluate(config, workdir: epath.PathLike):
  """Trains the model a config describes; rerun with the same workdir to resume.

  A config with `stages` runs the compression pipeline instead (one
  subdirectory per stage) and returns {stage: TrainResult}.
  """
  config_lib.validate(config)
  dataset = load_dataset(config.data, config.seed)
  if config.stages:
    from rtjax.compress.pipeline import run_pipeline  # compress builds on train
    return run_pipeline(config, workdir, dataset)
  spec = {"name": config.model.name, "args": model_args_for(config, dataset)}
  model = models.create_model(spec["name"], spec["args"], config.seed)
  return train_stage(config, config.train, workdir, dataset,
                     Stage(model=model, spec=spec))


def train_stage(config, train_cfg, workdir: epath.PathLike, dataset: Dataset,
                stage: Stage) -> TrainResult:
  """Trains `stage.model` on `dataset` with `train_cfg`, checkpointing into
  `workdir`; resumes from the latest checkpoint there."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_writer = jax.process_index() == 0
  model = stage.model
  size = model_size(model, dataset.input_shape)
  logging.info("stage %s (%s): model %s: %d parameters, %.3g FLOPs/example",
               stage.name, stage.type, stage.spec, size["param_count"],
               size["flops_per_example"])

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P("data"))

  def feed(*arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global batch arrays; each process supplies only its block of rows."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
      return jax.device_put(arrays, batch_sharded)
    return tuple(jax.make_array_from_process_local_data(
        batch_sharded, np.array_split(a, count)[index]) for a in arrays)

  tx = stage.wrap_optimizer(make_optimizer(train_cfg))
  train_graphdef, params, rest = nnx.split(models.training_view(model),
                                           nnx.Param, ...)
  opt_state = tx.init(params)

  checkpoints = RunCheckpoints(workdir / "checkpoints",
                               config.checkpoint.max_to_keep)
  start_step = checkpoints.latest_step() or 0
  if start_step:
    _check_same_model(checkpoints.metadata(start_step), stage.spec,
                      checkpoints.directory)
    state, opt_state = checkpoints.restore(start_step, nnx.state(model),
                                           opt_state)
    nnx.update(model, state)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    logging.info("resuming from step %d in %s", start_step,
                 checkpoints.directory)
  params, rest, opt_state = jax.device_put((params, rest, opt_state),
                                           replicated)

  num_classes = dataset.num_classes
  teacher = stage.teacher
  teacher_graphdef, teacher_state = (
      nnx.split(models.inference_view(teacher.model)) if teacher else (None, None))
  teacher_state = jax.device_put(teacher_state, replicated)

  @jax.jit
  def train_step(params, rest, opt_state, teacher_state, images, labels):
    def loss_fn(params, rest):
      model = nnx.merge(train_graphdef, params, rest, copy=True)
      logits = model(images)
      loss = _loss(logits, labels, num_classes, train_cfg.label_smoothing)
      if teacher is not None:
        t = teacher.temperature
        teacher_logits = jax.lax.stop_gradient(
            nnx.merge(teacher_graphdef, teacher_state)(images))
        kl = optax.kl_divergence(jax.nn.log_softmax(logits / t),
                                 jax.nn.softmax(teacher_logits / t))
        loss = teacher.alpha * t * t * kl + (1 - teacher.alpha) * loss
      new_rest = nnx.split(model, nnx.Param, ...)[2]
      return loss.mean(), (new_rest, logits)

    (loss, (new_rest, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return params, new_rest, opt_state, metrics

  def current_model() -> nnx.Module:
    nnx.update(model, params, rest)
    return model

  def evaluate_split(split: Split) -> dict[str, float]:
    return evaluate(current_model(), split, train_cfg.eval_batch_size, feed)

  metrics: dict[str, dict[str, float]] = {}

  batches = TrainBatches(dataset.train, train_cfg.batch_size, config.seed,
                         config.data.max_shift, config.data.random_flip)
  writer = MetricWriter(workdir, enabled=is_writer)
  window: list[dict] = []
  window_start, window_first_step = time.perf_counter(), start_step
  last_saved = start_step
  step = start_step
  preempted = False

  def flush_window(step: int) -> None:
    """Host sync: average the window's metrics, refuse NaN/inf, log them."""
    nonlocal window, window_start, window_first_step
    if not window:
      return
    values = jax.device_get(window)  # one transfer for the whole window
    means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    if not (math.isfinite(means["loss"]) and math.isfinite(means["grad_norm"])):
      raise NonFiniteLossError(
          f"loss or gradients became non-finite (loss={means['loss']}, "
          f"grad_norm={means['grad_norm']}) between steps {window_first_step}"
          f" and {step}. The last good checkpoint (step {last_saved}) is kept "
          f"in {checkpoints.directory}. Lower config.train.learning_rate or "
          "set config.train.grad_clip_norm.")
    elapsed = time.perf_counter() - window_start
    means["steps_per_sec"] = len(window) / max(elapsed, 1e-9)
    metrics["train"] = means
    writer.write(step, "train", means)
    bar.set_postfix(loss=f"{means['loss']:.4f}",
                    acc=f"{means['accuracy']:.3f}",
                    steps_per_s=f"{means['steps_per_sec']:.1f}")
    window, window_start, window_first_step = [], time.perf_counter(), step

  def save(step: int) -> None:
    nonlocal last_saved
    checkpoints.save(step, nnx.state(current_model()), opt_state,
                     stage_metadata(config, stage, dataset, step, metrics,
                                    size, step == train_cfg.num_steps))
    last_saved = step

  with PreemptionGuard() as preemption, tqdm(
      total=train_cfg.num_steps, initial=start_step, desc="train",
      disable=not is_writer, dynamic_ncols=True) as bar:
    try:
      for step in range(start_step + 1, train_cfg.num_steps + 1):
        images, labels = batches.batch(step - 1)
        params, rest, opt_state, step_metrics = train_step(
            params, rest, opt_state, teacher_state, *feed(images, labels))
        window.append(step_metrics)
        bar.update(1)
        last = step == train_cfg.num_steps
        # Read the flag once: SIGTERM may land anywhere in this iteration.
        stopping = preemption.requested and not last
        saving = step % config.checkpoint.every_steps == 0 or last or stopping
        if step % train_cfg.log_every == 0 or saving:
          flush_window(step)
        if step % train_cfg.eval_every == 0 or last:
          metrics["val"] = evaluate_split(dataset.val)
          writer.write(step, "val", metrics["val"])
        if last:
          metrics["test"] = evaluate_split(dataset.test)
          writer.write(step, "test", metrics["test"])
        if saving:
          save(step)
        if stopping:
          preempted = True
          logging.warning("preempted: checkpoint saved at step %d in %s; "
                          "rerun the same command to resume", step,
                          checkpoints.directory)
          break
      if start_step >= train_cfg.num_steps:
        logging.info("run already complete at step %d", start_step)
        metrics.update(checkpoints.metadata(start_step)["metrics"])
    finally:
      checkpoints.wait()
      checkpoints.close()
      writer.close()

  if "test" in metrics:
    logging.info("step %d: test accuracy %.4f, loss %.4f", step,
                 metrics["test"]["accuracy"], metrics["test"]["loss"])
  return TrainResult(step=max(step, start_step), preempted=preempted,
                     metrics=metrics, checkpoint_dir=checkpoints.directory)
