"""Real multi-process training: two JAX processes on localhost (gloo), each
with two CPU devices. An uninterrupted run, and a run preempted on one host
only: both hosts save the same step and exit 0, and the rerun resumes to the
uninterrupted run's parameters."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax.checkpoint import load_checkpoint
from rtjax.train.metrics import read_metrics
from tests.conftest import REPO, built_once, free_port

pytestmark = pytest.mark.slow

# Each step costs two processes their gloo collectives (~0.15 CPU s each):
# 60 steps reach the accuracy asserted below and leave ~50 steps between the
# first logged step (when SIGTERM is sent) and the end.
STEPS = 60
ARGS = ["--config=configs/default.py:tiny", f"--config.train.num_steps={STEPS}",
        "--config.checkpoint.every_steps=30", "--config.train.eval_every=30",
        "--noreport"]


def start(workdir):
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "experiments.main", *ARGS, f"--workdir={workdir}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"}) for i in range(2)]


def finish(procs):
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def params_of(path):
  return nnx.to_pure_dict(nnx.state(load_checkpoint(path)[0]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  def build():
    workdir = tmp_path_factory.mktemp("two_processes")
    finish(start(workdir))
    return workdir
  return built_once(tmp_path_factory, "uninterrupted", build)


def test_two_processes_train_and_only_process_0_writes(uninterrupted):
  records = read_metrics(uninterrupted)
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys))  # written once: by process 0 only
  assert len(list((uninterrupted / "tensorboard").iterdir())) == 1
  _, metadata = load_checkpoint(uninterrupted)
  assert metadata["step"] == STEPS
  assert metadata["metrics"]["test"]["accuracy"] >= 0.9


def test_sigterm_to_one_host_saves_the_same_step_on_both(uninterrupted,
                                                          tmp_path):
  workdir = tmp_path / "run"
  procs = start(workdir)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().strip()):
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # one host only, as a pod would
  outs = finish(procs)
  stopped = [int(out.split("preempted at step")[1].split(";")[0])
             for out, _ in outs]
  assert stopped[0] == stopped[1] < STEPS, outs
  assert load_checkpoint(workdir)[1]["step"] == stopped[0]

  outs = finish(start(workdir))
  assert f"resuming from step {stopped[0]}" in outs[0][1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               params_of(workdir), params_of(uninterrupted))
