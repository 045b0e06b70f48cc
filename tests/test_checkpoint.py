"""Damaged and foreign checkpoints: a damaged newest step is moved aside and
the run resumes from the newest intact one; corruption and checkpoints from
a newer rtjax are refused with a clear message; a step that cannot be written
(a full disk) stops the run with one line and the rerun resumes; the stamp is
recorded."""

import errno
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rtjax.checkpoint import CheckpointError, SCHEMA_VERSION, load_checkpoint
from rtjax.checkpoint.store import CheckpointWriteError
from rtjax.train import train_and_evaluate
from tests.conftest import run_module


def params_of(path):
  return nnx.to_pure_dict(nnx.state(load_checkpoint(path)[0]))


def copy_run(workdir, to):
  shutil.copytree(workdir / "checkpoints", to / "checkpoints")
  return to


def array_files(step_dir):
  return sorted(p for p in (step_dir / "model").rglob("*")
                if p.is_file() and p.parent.name == "d")


def rewrite_metadata(step_dir, **changes):
  path = step_dir / "metadata" / "metadata"
  metadata = json.loads(path.read_text())
  path.write_text(json.dumps({**metadata, **changes}))


def test_metadata_records_schema_versions_device_and_hash(trained):
  _, workdir, _ = trained
  _, metadata = load_checkpoint(workdir)
  assert metadata["schema_version"] == SCHEMA_VERSION
  assert set(metadata["versions"]) == {"rtjax", "jax", "flax",
                                       "orbax-checkpoint", "qwix"}
  assert metadata["versions"]["jax"] == jax.__version__
  assert metadata["device_kind"] == jax.devices()[0].device_kind
  assert len(metadata["params_sha256"]) == 64


@pytest.mark.slow
def test_truncated_newest_step_is_moved_aside_and_the_run_finishes(
    trained, tmp_path):
  config, workdir, _ = trained
  run = copy_run(workdir, tmp_path / "run")
  victim = array_files(run / "checkpoints" / "150")[0]
  victim.write_bytes(victim.read_bytes()[:10])
  with pytest.raises(CheckpointError, match="150.*cannot be restored"):
    load_checkpoint(run)  # serving refuses it and changes nothing
  assert (run / "checkpoints" / "150").exists()
  result = train_and_evaluate(config, run)
  assert result.step == 150
  aside = [p.name for p in (run / "checkpoints").iterdir()
           if p.name.startswith("damaged-step-150-")]
  assert len(aside) == 1
  # Resumed from the intact step 100: the same parameters as never damaged.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               params_of(run), params_of(workdir))


@pytest.mark.slow
def test_removed_file_cli_names_the_step_and_resumes(trained, tmp_path):
  _, workdir, _ = trained
  run = copy_run(workdir, tmp_path / "run")
  (run / "checkpoints" / "150" / "metadata" / "metadata").unlink()
  result = run_module("experiments.main", "--config=configs/default.py:tiny",
                      f"--workdir={run}", "--noreport")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint step 150" in result.stderr and "is damaged" in result.stderr
  assert "resuming from step 100" in result.stderr
  assert load_checkpoint(run)[1]["step"] == 150


def test_no_intact_step_is_one_clear_error(trained, tmp_path):
  config, workdir, _ = trained
  run = copy_run(workdir, tmp_path / "run")
  for step in ("100", "150"):
    for path in array_files(run / "checkpoints" / step):
      path.unlink()
  with pytest.raises(CheckpointError, match="no intact checkpoint.*step 150"
                     ".*step 100"):
    train_and_evaluate(config, run)


def test_content_hash_catches_silent_corruption(trained, tmp_path):
  _, workdir, _ = trained
  run = copy_run(workdir, tmp_path / "run")
  rewrite_metadata(run / "checkpoints" / "150", params_sha256="0" * 64)
  with pytest.raises(CheckpointError, match="content hash"):
    load_checkpoint(run)


def test_checkpoint_of_a_newer_rtjax_is_refused_and_left_alone(trained,
                                                                tmp_path):
  config, workdir, _ = trained
  run = copy_run(workdir, tmp_path / "run")
  rewrite_metadata(run / "checkpoints" / "150",
                   schema_version=SCHEMA_VERSION + 1,
                   versions={"rtjax": "9.0.0"})
  with pytest.raises(CheckpointError, match="rtjax 9.0.0.*upgrade rtjax"):
    load_checkpoint(run)
  with pytest.raises(CheckpointError, match="upgrade rtjax"):
    train_and_evaluate(config, run)
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
      "100", "150"]


@pytest.mark.slow
def test_a_step_that_cannot_be_written_stops_the_run_and_keeps_the_rest(
    trained, tmp_path, monkeypatch):
  """The disk fills while step 150's metadata is written (in orbax's
  background thread); the failure surfaces at the next save (200)."""
  import orbax.checkpoint as ocp
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.train.num_steps = 200
  run = copy_run(workdir, tmp_path / "run")
  shutil.rmtree(run / "checkpoints" / "150")
  write = ocp.JsonCheckpointHandler._save_fn

  async def disk_full_at_150(self, x, directory):
    if str(directory).startswith(str(run / "checkpoints" / "150.")):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await write(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_150)
  with pytest.raises(CheckpointWriteError, match=(
      r"step 150 could not be written to .*checkpoints: no space left on "
      r"device.*rerun the same command: it resumes from step 100")):
    train_and_evaluate(config, run)
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["100"]
  monkeypatch.undo()
  assert train_and_evaluate(config, run).step == 200
  assert load_checkpoint(run)[1]["step"] == 200


@pytest.fixture
def small_disk(tmp_path):
  """A 600 KiB tmpfs: room for one step of the tiny run, not for two."""
  mount = tmp_path / "small_disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs",
                     str(mount)], capture_output=True).returncode:
    pytest.skip("mounting a small tmpfs needs root")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_ends_with_one_line_and_the_rerun_resumes(trained,
                                                            small_disk):
  config, workdir, _ = trained
  run = small_disk
  shutil.copytree(workdir / "checkpoints" / "100", run / "checkpoints" / "100")
  result = run_module("experiments.main", "--config=configs/default.py:tiny",
                      f"--workdir={run}", "--noreport")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1] == (
      f"error: checkpoint step 150 could not be written to {run}/checkpoints: "
      "no space left on device (its partial files were removed). Free some "
      "space and rerun the same command: it resumes from step 100, the "
      "newest intact one")
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["100"]
  subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)],
                 check=True)
  assert train_and_evaluate(config, run).step == 150
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               params_of(run), params_of(workdir))


def test_a_full_disk_anywhere_ends_a_command_with_one_line(small_disk):
  target = small_disk / "metrics.jsonl"
  program = ("from experiments import cli\n"
             "def main(argv):\n"
             f"  with open({str(target)!r}, 'w') as f: f.write('x' * 2**21)\n"
             "cli.run(main)\n")
  result = subprocess.run([sys.executable, "-c", program], capture_output=True,
                          text=True)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1] == (
      "error: no space left on device; free some space and rerun the same "
      "command (training resumes from its newest intact checkpoint)")


@pytest.mark.slow
def test_inspect_prints_lineage_metrics_and_versions(trained):
  _, workdir, _ = trained
  result = run_module("experiments.inspect", str(workdir), "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)
  assert summary["lineage"] == "none (trained from scratch)"
  assert summary["metrics"]["test"]["accuracy"] >= 0.95
  assert summary["versions"]["jax"] == jax.__version__
  assert summary["checkpoint"].endswith("checkpoints/150")
