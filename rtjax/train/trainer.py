"""Training one model: config -> trained, evaluated, checkpointed model.

Reads top to bottom: what a stage brings (Stage), the metadata a checkpoint
records, then `train_model`: data placement, optimizer, resume from the
newest intact checkpoint, the loop (step, log, evaluate, save when orbax
says so or at preemption, NaN guard) and the final test evaluation. How a
model is compressed is the pipeline's business (rtjax.pipeline): a stage
hands this module a model, a loss and an optimizer wrapper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from rtjax import config as config_lib
from rtjax import models
from rtjax.checkpoint import RunCheckpoints
from rtjax.data import Dataset, Split, TrainBatches, load_dataset
from rtjax.errors import CheckpointError, ConfigError, RunError
from rtjax.train.evaluate import evaluate
from rtjax.train.metrics import MetricWriter, TrainMetrics
from rtjax.train.optim import make_optimizer
from rtjax.train.preemption import Preemption
from rtjax.train.step import CrossEntropy, train_step


class NonFiniteLossError(RunError):
  """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  step: int
  preempted: bool
  metrics: dict[str, dict[str, float]]  # split -> metric -> value
  checkpoint_dir: epath.Path


@dataclasses.dataclass
class Stage:
  """What one training run starts from and how it differs from plain training.

  `spec` rebuilds the model from the checkpoint alone ({'name', 'args'} and,
  for quantized models, 'quantization'); `loss` (default: cross-entropy with
  the config's label smoothing) and `loss_state` (arrays it reads, e.g. a
  teacher's weights) replace the objective; `wrap_optimizer` adds e.g.
  pruning masks around the config's optax optimizer; `done` records what the
  stage did (lineage metadata)."""
  model: nnx.Module
  spec: dict
  name: str = "train"
  type: str = "train"
  parent: str | None = None
  wrap_optimizer: Callable[[optax.GradientTransformation],
                           optax.GradientTransformation] = lambda tx: tx
  loss: Callable | None = None
  loss_state: Any = None
  done: dict = dataclasses.field(default_factory=dict)


def model_spec(model_config, dataset: Dataset) -> dict:
  """{'name', 'args'} of a config's model section on this dataset: the
  family's full constructor arguments, the config's plus the dataset's, in
  their JSON form (lists, not tuples) as the checkpoint metadata holds them."""
  args = {**model_config.get("args", {}), "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape)}
  return {"name": model_config.name, "args": json.loads(json.dumps(args))}


def model_size(model: nnx.Module, input_shape) -> dict:
  return {"param_count": models.param_count(model),
          "flops_per_example": models.forward_flops(model, input_shape)}


def stage_metadata(config, train_cfg, stage: Stage, dataset: Dataset,
                   step: int, metrics: dict, size: dict,
                   complete: bool) -> dict:
  """The run facts every checkpoint carries (the store adds its stamp)."""
  return {
      "stage": stage.name,
      "stage_type": stage.type,
      "parent": stage.parent,
      "done": stage.done,
      "model": stage.spec,
      "dataset": dataset.describe(),
      "config": config.to_dict(),
      "train": train_cfg.to_dict(),  # with the stage's overrides
      "seed": config_lib.init_seed(config, train_cfg),
      "step": step,
      "complete": complete,  # the stage's last step: a rerun skips it
      **size,
      "metrics": metrics,
  }


def train_and_evaluate(config, workdir: epath.PathLike) -> TrainResult:
  """Trains the model a config without stages describes (plain training);
  rerun with the same workdir to resume. Configs with `stages` are run by
  rtjax.pipeline.run_pipeline."""
  config_lib.validate(config)
  if config.stages:
    raise ConfigError("config.stages is set: run it with "
                      "rtjax.pipeline.run_pipeline (experiments.main does)")
  dataset = load_dataset(config.data, config.seed)
  spec = model_spec(config.model, dataset)
  model = models.create_model(spec["name"], spec["args"],
                              config_lib.init_seed(config, config.train))
  return train_model(config, config.train, workdir, dataset,
                     Stage(model=model, spec=spec))


def _check_same_model(spec: dict, directory) -> Callable[[dict], None]:
  def check(saved: dict) -> None:
    if saved["model"] != spec:
      raise CheckpointError(
          f"{directory} holds checkpoints of model {saved['model']}, but this "
          f"run builds {spec}. Use a new --workdir, or the config that wrote "
          "this run.")
  return check


class Placement:
  """Arrays on the run's data-parallel mesh: weights replicated, batches
  split by rows; each process supplies only its block of rows. `devices`:
  all of the run's (default), or a slice that is not attached, which a
  compile for that target places the same way."""

  def __init__(self, devices=None):
    devices = jax.devices() if devices is None else list(devices)
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(mesh, P())
    self.rows = NamedSharding(mesh, P("data"))

  def feed(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
      return jax.device_put(arrays, self.rows)
    return tuple(jax.make_array_from_process_local_data(
        self.rows, np.array_split(a, count)[index]) for a in arrays)


class _Run:
  """One run's arrays on the mesh (params, the rest of the model state,
  optimizer state, the metric window) and what is done with them: a step,
  an evaluation, a checkpoint."""

  def __init__(self, config, train_cfg, dataset: Dataset, stage: Stage,
               size: dict):
    self.config, self.train_cfg, self.dataset = config, train_cfg, dataset
    self.stage, self.size, self.model = stage, size, stage.model
    self.place = Placement()
    self.tx = stage.wrap_optimizer(make_optimizer(train_cfg))
    self.loss = stage.loss or CrossEntropy(dataset.num_classes,
                                           train_cfg.label_smoothing)
    self.graphdef, self.params, self.rest = nnx.split(
        models.training_view(self.model), nnx.Param, ...)
    self.opt_state = self.tx.init(self.params)
    self.batches = TrainBatches(dataset.train, train_cfg.batch_size,
                                config_lib.init_seed(config, train_cfg),
                                config.data.max_shift, config.data.random_flip)
    self.window = TrainMetrics(self.place.replicated)
    self.metrics: dict[str, dict[str, float]] = {}

  def resume(self, checkpoints: RunCheckpoints) -> int:
    """The newest intact step's state (0: none yet), placed on the mesh."""
    start_step, state, opt_state = checkpoints.restore_latest(
        nnx.state(self.model), self.opt_state,
        _check_same_model(self.stage.spec, checkpoints.directory),
        self.place.replicated)
    if start_step:
      nnx.update(self.model, state)
      _, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)
      self.opt_state = opt_state
      logging.info("resuming from step %d in %s", start_step,
                   checkpoints.directory)
    self.params, self.rest, self.opt_state, self.loss_state = jax.device_put(
        (self.params, self.rest, self.opt_state, self.stage.loss_state),
        self.place.replicated)
    return start_step

  def step(self, step: int) -> None:
    """Trains on batch `step` (counted from 1)."""
    self.params, self.rest, self.opt_state, self.window.state = train_step(
        self.graphdef, self.tx, self.loss, self.window.graphdef, self.params,
        self.rest, self.opt_state, self.window.state,
        *self.place.feed(*self.batches.batch(step - 1)), self.loss_state)
    self.window.steps += 1

  def evaluate(self, split: Split) -> dict[str, float]:
    nnx.update(self.model, self.params, self.rest)
    return evaluate(self.model, split, self.train_cfg.eval_batch_size,
                    self.place.feed)

  def save(self, checkpoints: RunCheckpoints, step: int) -> None:
    nnx.update(self.model, self.params, self.rest)
    checkpoints.save(step, nnx.state(self.model), self.opt_state,
                     stage_metadata(self.config, self.train_cfg, self.stage,
                                    self.dataset, step, self.metrics,
                                    self.size, complete=step ==
                                    self.train_cfg.num_steps))


def train_model(config, train_cfg, workdir: epath.PathLike, dataset: Dataset,
                stage: Stage) -> TrainResult:
  """Trains `stage.model` on `dataset` with `train_cfg`, checkpointing into
  `workdir`; resumes from the newest intact checkpoint there."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  size = model_size(stage.model, dataset.input_shape)
  logging.info("stage %s (%s): model %s: %d parameters, %.3g FLOPs/example",
               stage.name, stage.type, stage.spec, size["param_count"],
               size["flops_per_example"])
  run = _Run(config, train_cfg, dataset, stage, size)
  checkpoints = RunCheckpoints(workdir / "checkpoints",
                               config.checkpoint.max_to_keep,
                               save_every=config.checkpoint.every_steps)
  start_step = run.resume(checkpoints)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  # Closed last to first, each even when another raised: a step still being
  # written is finished (or its failure raised) before anything else.
  with Preemption() as preemption, tqdm(
      total=train_cfg.num_steps, initial=start_step, desc="train",
      disable=jax.process_index() != 0, dynamic_ncols=True) as bar, \
      contextlib.closing(writer), contextlib.closing(checkpoints):
    step, preempted = _train_steps(run, start_step, checkpoints, writer, bar,
                                   preemption)
    if start_step >= train_cfg.num_steps:
      logging.info("run already complete at step %d", start_step)
      run.metrics.update(checkpoints.metadata(start_step)["metrics"])
  if "test" in run.metrics:
    logging.info("step %d: test accuracy %.4f, loss %.4f", step,
                 run.metrics["test"]["accuracy"], run.metrics["test"]["loss"])
  return TrainResult(step=max(step, start_step), preempted=preempted,
                     metrics=run.metrics, checkpoint_dir=checkpoints.directory)


def _train_steps(run: _Run, start_step: int, checkpoints: RunCheckpoints,
                 writer: MetricWriter, bar, preemption: Preemption
                 ) -> tuple[int, bool]:
  """The loop: step, log, evaluate, save when orbax says so or at
  preemption. Returns (last step taken, whether preempted)."""
  train_cfg, metrics = run.train_cfg, run.metrics
  step, last_saved = start_step, start_step
  for step in range(start_step + 1, train_cfg.num_steps + 1):
    run.step(step)
    bar.update(1)
    last = step == train_cfg.num_steps
    stopping = preemption.reached() and not last
    saving = last or stopping or checkpoints.should_save(step)
    if step % train_cfg.log_every == 0 or saving:
      metrics["train"] = _log_window(run.window, step, last_saved, writer,
                                     bar, checkpoints.directory)
    if ((step % train_cfg.eval_every == 0 or last)
        and len(run.dataset.val.labels)):  # none: val_fraction=0
      metrics["val"] = run.evaluate(run.dataset.val)
      writer.write(step, "val", metrics["val"])
    if last:
      metrics["test"] = run.evaluate(run.dataset.test)
      writer.write(step, "test", metrics["test"])
    if saving:
      run.save(checkpoints, step)
      last_saved = step
    if stopping:
      logging.warning("preempted: checkpoint saved at step %d in %s; rerun "
                      "the same command to resume", step,
                      checkpoints.directory)
      return step, True
  return step, False


def _log_window(window: TrainMetrics, step: int, last_saved: int,
                writer: MetricWriter, bar, directory) -> dict[str, float]:
  """Host sync: the window's means; refuses NaN/inf, logs, starts anew."""
  if not window.steps:
    return {}
  means = window.compute()
  if not (math.isfinite(means["loss"]) and math.isfinite(means["grad_norm"])):
    raise NonFiniteLossError(
        f"loss or gradients became non-finite (loss={means['loss']}, "
        f"grad_norm={means['grad_norm']}) in the {window.steps} steps up to "
        f"step {step}. The last good checkpoint (step {last_saved}) is kept "
        f"in {directory}. Lower config.train.learning_rate or set "
        "config.train.grad_clip_norm.")
  writer.write(step, "train", means)
  bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.3f}",
                  steps_per_s=f"{means['steps_per_sec']:.1f}")
  window.reset()
  return means
