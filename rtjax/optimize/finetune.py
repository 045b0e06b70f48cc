"""One rung of one candidate: a stage of its own in the search's workdir
(`candidates/<name>/rung<k>`), trained by distillation from the parent with
the parent's recipe for a rung's number of steps, with lineage in its
metadata (parent: the parent checkpoint for rung 0, the previous rung
after). rtjax's trainer checkpoints it, so a killed rung resumes and a
finished one is read, never retrained.
"""

from __future__ import annotations

import ml_collections
from etils import epath
from flax import nnx

from rtjax import models
from rtjax.checkpoint import finished_stage, load_checkpoint
from rtjax.compress.distill import ALPHA, TEMPERATURE, DistillationLoss
from rtjax.data import Dataset
from rtjax.optimize import candidates
from rtjax.train import CrossEntropy, Stage, train_model

def train_rung(parent_dir: epath.Path, parent_meta: dict, teacher: nnx.Module,
               dataset: Dataset, recipe: dict, model: nnx.Module, spec: dict,
               stage_dir: epath.Path, start_dir: epath.Path | None,
               steps: int, fine_tune_lr: float) -> dict:
  """Trains (or resumes) one rung and returns its final metadata. `model`
  is the candidate's starting point for rung 0; later rungs start from
  `start_dir`, the previous rung. Trained weights fine-tune at
  `fine_tune_lr` times the parent's learning rate."""
  if start_dir is not None:
    model, _ = load_checkpoint(start_dir)
  config = ml_collections.ConfigDict(parent_meta["config"])
  train = ml_collections.ConfigDict(parent_meta["train"])
  scratch = candidates.from_scratch(recipe) and start_dir is None
  train.update(num_steps=steps, warmup_steps=max(1, min(
      train.warmup_steps, steps // 10)), eval_every=steps,
      log_every=max(1, min(train.log_every, steps)),
      learning_rate=train.learning_rate * (1.0 if scratch else fine_tune_lr))
  config.checkpoint.every_steps = max(1, steps // 2)
  graphdef, state = nnx.split(models.inference_view(teacher))
  loss = DistillationLoss(graphdef, ALPHA, TEMPERATURE, CrossEntropy(
      dataset.num_classes, train.label_smoothing))
  lineage = str(start_dir or parent_dir)
  stage = Stage(model, spec, f"{recipe['name']}/{stage_dir.name}",
                "optimize_candidate", lineage, loss=loss, loss_state=state,
                done={"recipe": recipe, "rung_steps": steps,
                      "distilled_from": str(parent_dir),
                      "alpha": ALPHA, "temperature": TEMPERATURE})
  train_model(config, train, stage_dir, dataset, stage)
  return finished_stage(stage_dir)
