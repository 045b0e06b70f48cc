"""Training end to end: outputs, checkpoints readable by plain orbax, resume,
preemption (SIGTERM), the NaN guard and clear checkpoint errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax.data import load_dataset
from rtjax.checkpoint import CheckpointError, load_checkpoint
from rtjax.train import read_metrics, train_and_evaluate
from rtjax.train.step import train_step
from tests.conftest import REPO, run_module


def params_of(path):
  model, _ = load_checkpoint(path)
  return nnx.to_pure_dict(nnx.state(model))


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0),
               a, b)


def test_tiny_run_learns_and_writes_its_outputs(trained):
  config, workdir, result = trained
  assert result.step == config.train.num_steps and not result.preempted
  assert result.metrics["test"]["accuracy"] >= 0.95
  records = read_metrics(workdir)
  splits = {r["split"] for r in records}
  assert splits == {"train", "val", "test"}
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == list(range(10, config.train.num_steps + 1, 10))
  assert all({"loss", "accuracy", "steps_per_sec"} <= r.keys()
             for r in records if r["split"] == "train")
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps == [100, 150]  # every 50 steps, max_to_keep=2


def test_checkpoint_rebuilds_its_model_alone(trained):
  config, workdir, result = trained
  model, metadata = load_checkpoint(workdir)
  assert metadata["step"] == config.train.num_steps
  assert metadata["stage"] == "train" and metadata["parent"] is None
  assert metadata["model"]["name"] == "resnet"
  assert metadata["model"]["args"]["input_shape"] == [8, 8, 1]
  assert metadata["config"]["train"]["learning_rate"] == config.train.learning_rate
  assert metadata["metrics"]["test"] == result.metrics["test"]
  # The rebuilt model reproduces the recorded test accuracy.
  from rtjax.models import inference_view
  test = load_dataset(config.data, config.seed).test
  logits = inference_view(model)(test.images)
  accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  assert accuracy == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-6)


def test_checkpoint_is_readable_by_plain_orbax(trained):
  _, workdir, _ = trained
  code = f"""
import json, sys
import orbax.checkpoint as ocp
manager = ocp.CheckpointManager({str(workdir / 'checkpoints')!r},
                                item_names=('model', 'metadata'))
step = manager.latest_step()
r = manager.restore(step, args=ocp.args.Composite(
    model=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
assert not any(m.startswith('rtjax') for m in sys.modules)
print(json.dumps({{'step': step, 'model': r.metadata['model']['name'],
                  'stem': list(r.model['stem']['kernel'].shape),
                  'bn': sorted(r.model['stem_bn'])}}))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, cwd="/", timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {
      "step": 150, "model": "resnet", "stem": [3, 3, 1, 16],
      "bn": ["bias", "mean", "scale", "var"]}


def test_resume_after_interruption_equals_uninterrupted(trained, tmp_path):
  """A run that stopped after its step-100 checkpoint, resumed, ends bit-equal."""
  config, workdir, _ = trained
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints", resumed / "checkpoints")
  shutil.rmtree(resumed / "checkpoints" / "150")
  programs = train_step._cache_size()
  result = train_and_evaluate(config, resumed)
  assert result.step == 150
  # One program for the whole run: the metric window starts where the step
  # leaves it (placed as the step's outputs), so its 2nd call is no compile.
  assert train_step._cache_size() == programs + 1
  assert [r["step"] for r in read_metrics(resumed)][0] == 110  # resumed at 100
  assert_trees_close(params_of(resumed), params_of(workdir), atol=1e-6)
  assert result.metrics["test"] == pytest.approx(
      load_checkpoint(workdir)[1]["metrics"]["test"], abs=1e-6)


def test_rerun_of_a_finished_run_changes_nothing(trained):
  config, workdir, result = trained
  before = params_of(workdir)
  again = train_and_evaluate(config, workdir)
  assert again.step == result.step
  assert again.metrics["test"] == result.metrics["test"]
  assert_trees_close(params_of(workdir), before, atol=0)


def test_workdir_of_another_architecture_is_refused(trained, tmp_path):
  config, workdir, _ = trained
  other = tmp_path / "other"
  shutil.copytree(workdir / "checkpoints", other / "checkpoints")
  changed = config.copy_and_resolve_references()
  changed.model.args.stage_widths = (16, 64)
  with pytest.raises(CheckpointError, match="holds checkpoints of model"):
    train_and_evaluate(changed, other)


def test_checkpoint_errors_name_the_path(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(CheckpointError, match="does not exist"):
    load_checkpoint(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no finished rtjax checkpoint"):
    load_checkpoint(tmp_path / "empty")
  half = tmp_path / "run" / "checkpoints" / "150.orbax-checkpoint-tmp-1234"
  shutil.copytree(workdir / "checkpoints" / "150", half)
  with pytest.raises(CheckpointError, match="half-written"):
    load_checkpoint(half)
  # Only the temporary directory there: the run has no finished checkpoint.
  with pytest.raises(CheckpointError, match="no finished rtjax checkpoint"):
    load_checkpoint(tmp_path / "run")
  truncated = tmp_path / "trunc" / "checkpoints" / "150"
  shutil.copytree(workdir / "checkpoints" / "150", truncated)
  for array_dir in (truncated / "model").iterdir():
    if array_dir.is_dir():
      shutil.rmtree(array_dir)
  with pytest.raises(CheckpointError, match="cannot be restored"):
    load_checkpoint(truncated)


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted(tiny_config, tmp_path):
  overrides = ["--config=configs/default.py:tiny",
               "--config.train.num_steps=200",
               "--config.checkpoint.every_steps=100"]
  preempted = tmp_path / "preempted"
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.main", *overrides,
       f"--workdir={preempted}"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  metrics = preempted / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().strip()):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  assert "preempted at step" in stdout
  stopped_at = int(stdout.split("preempted at step")[1].split(";")[0])
  assert 10 <= stopped_at < 200
  assert load_checkpoint(preempted)[1]["step"] == stopped_at

  resumed = run_module("experiments.main", *overrides, f"--workdir={preempted}")
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming from step {stopped_at}" in resumed.stderr

  config = tiny_config
  config.train.num_steps, config.checkpoint.every_steps = 200, 100
  straight = tmp_path / "straight"
  train_and_evaluate(config, straight)
  assert_trees_close(params_of(preempted), params_of(straight), atol=1e-6)


@pytest.mark.slow
def test_cli_with_a_relative_workdir(tmp_path):
  """As the README runs it: `--workdir=workdirs/...`, relative to the cwd."""
  relative = os.path.relpath(tmp_path / "run", REPO)
  result = run_module("experiments.main", "--config=configs/default.py:tiny",
                      f"--workdir={relative}", "--config.train.num_steps=20",
                      "--config.train.warmup_steps=2", "--noreport")
  assert result.returncode == 0, result.stderr[-3000:]
  assert load_checkpoint(tmp_path / "run")[1]["step"] == 20
  # Orbax's per-file INFO logs are filtered out; rtjax's own lines stay.
  assert "checkpoint_manager.py" not in result.stderr
  assert "trainer.py" in result.stderr


@pytest.mark.slow
def test_nan_loss_stops_keeps_last_good_checkpoint_and_exits_nonzero(tmp_path):
  result = run_module(
      "experiments.main", "--config=configs/default.py:tiny",
      f"--workdir={tmp_path}", "--config.train.optimizer=sgd",
      "--config.train.learning_rate=1e8", "--config.train.schedule=constant",
      "--config.train.warmup_steps=0", "--config.train.log_every=1",
      "--config.checkpoint.every_steps=1")
  assert result.returncode == 1, result.stderr
  assert "became non-finite" in result.stderr
  assert "last good checkpoint" in result.stderr
  model, metadata = load_checkpoint(tmp_path)
  assert metadata["step"] < 150
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(np.all(np.isfinite(x)) for x in leaves)


def test_metrics_lines_append_in_both_modes(tmp_path):
  from etils import epath
  from rtjax.train.metrics import append_line
  for rewrite in (False, True):  # True: how gs:// files are extended
    path = epath.Path(tmp_path) / f"log{rewrite}.jsonl"
    for i in range(3):
      append_line(path, json.dumps({"i": i}), rewrite=rewrite)
    assert [json.loads(l)["i"] for l in path.read_text().splitlines()] == [0, 1, 2]
