"""Cloud TPU launcher: dry-run commands, quoting, user errors, the whole flow
against a fake gcloud (every remote python is the venv's; one worker failing
stops the rest by their TPU devices), and multi-process training."""

import json
import os
import re
import shlex
import sys
import tarfile

import pytest

from rtjax import errors, tpu
from tests.conftest import REPO, run_module

NASTY = ["--config=configs/default.py:tiny",
         "--workdir=gs://bucket/run with space",
         "--config.data.dir=it's; rm -rf / #", '--note="$(reboot)"']


def dry_run(*flags):
  result = run_module("experiments.launch", "--tpu=rt", "--zone=us-west4-a",
                      "--project=proj", "--dry_run", "--skip_preflight", *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  return [line for line in result.stdout.splitlines()
          if not line.startswith("#")]


@pytest.mark.parametrize("accelerator,workers,runtime", [
    ("v4-8", 1, "tpu-ubuntu2204-base"), ("v4-32", 4, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"), ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
    ("v5p-16", 2, "v2-alpha-tpuv5"), ("v6e-8", 1, "v2-alpha-tpuv6e")])
def test_commands_per_accelerator(accelerator, workers, runtime):
  # In process: the launcher takes seconds to start; the flag plumbing is
  # covered by the dry runs and the fake-gcloud flow below.
  commands = tpu.LaunchPlan(
      tpu.TpuSpec("rt", "us-west4-a", "proj", accelerator),
      main_args=["--config=configs/default.py:tpu"], create=True,
      delete_after=True).commands()
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert f"--accelerator-type={accelerator}" in commands[0]
  assert f"--version={runtime}" in commands[0]
  assert commands[1][4] == "scp" and "--worker=all" in commands[1]
  assert commands[2][4] == "ssh" and "--worker=all" in commands[2]
  runs = commands[3:-1]
  assert [c[8] for c in runs] == [f"--worker={i}" for i in range(workers)]
  assert all("experiments.main --multihost" in c[9] for c in runs)
  assert commands[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]


def test_queued_spot_and_git_variants():
  commands = [shlex.split(line) for line in dry_run(
      "--accelerator_type=v5p-8", "--create", "--queued", "--spot",
      "--git_url=https://example.com/rtjax.git", "--git_ref=v1.0")]
  assert commands[0][3:5] == ["queued-resources", "create"]
  assert "--spot" in commands[0] and "--node-id=rt" in commands[0]
  assert commands[1][3:5] == ["queued-resources", "describe"]
  assert not any(c[4] == "scp" for c in commands)  # code comes from git
  setup = commands[2][-1]
  assert "git clone https://example.com/rtjax.git rtjax" in setup
  assert "checkout --quiet v1.0" in setup


def test_no_argument_can_inject_a_command():
  lines = dry_run("--accelerator_type=v4-16", "--", *NASTY)
  for line in lines[2:]:
    remote = shlex.split(line)[-1].removeprefix("--command=")
    words = shlex.split(remote)  # what the worker's shell will see
    assert words[:2] == ["cd", "rtjax"] and words[2] == "&&"
    assert words[-len(NASTY):] == NASTY  # each argument arrives whole
    assert words.count("&&") == 1


def test_unknown_accelerator_is_named():
  with pytest.raises(errors.LaunchError, match="unknown accelerator type 'v9-8'"):
    tpu.num_workers("v9-8")
  with pytest.raises(errors.LaunchError):  # before any command is built
    tpu.TpuSpec("rt", "z", "p", "v9-8", runtime_version="tpu-ubuntu2204-base")


def test_unknown_accelerator_is_one_line_and_exit_code_2():
  result = run_module("experiments.launch", "--tpu=rt", "--zone=z",
                      "--project=p", "--accelerator_type=v9-8", "--dry_run")
  assert result.returncode == 2
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
  assert "v9-8" in lines[0] and "Traceback" not in result.stderr


def test_source_archive_holds_tracked_files_only(tmp_path):
  archive = tpu.package_source(REPO, tmp_path / "src.tar.gz")
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "rtjax/tpu.py", "experiments/main.py"} <= names
  assert not any(n.startswith((".venv", "workdirs", ".git/")) for n in names)


FAKE_GCLOUD = """#!{python}
import json, os, sys, time
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(argv) + "\\n")
command = next((a for a in argv if a.startswith("--command=")), "")
worker = next((a.split("=")[1] for a in argv if a.startswith("--worker=")), "")
if "describe" in argv:
  print("ACTIVE")
elif "-m experiments.main" in command:
  if worker == os.environ.get("FAKE_GCLOUD_FAIL_WORKER"):
    time.sleep(0.5)
    sys.exit(3)
  time.sleep(float(os.environ.get("FAKE_GCLOUD_RUN_SECONDS", "0.2")))
  open(os.path.join(os.environ["FAKE_GCLOUD_DONE"], worker), "w").close()
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir, done = tmp_path / "bin", tmp_path / "done"
  bin_dir.mkdir(), done.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log),
         "FAKE_GCLOUD_DONE": str(done)}

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()]

  return env, calls, done


def shell_steps(remote: str) -> list[list[str]]:
  """The `&&`-joined steps of a remote command as the worker's shell splits
  them, without leading VAR=value assignments."""
  steps = [[]]
  for word in shlex.split(remote):
    if word == "&&":
      steps.append([])
    elif steps[-1] or not re.fullmatch(r"[A-Z_]+=\S*", word):
      steps[-1].append(word)
  return steps


def assert_python_is_the_venvs(remote: str) -> None:
  """The image's python3 (3.10 on the TPU runtime images) only installs and
  runs uv; every other python the command names is the venv's."""
  for step in shell_steps(remote):
    for i, word in enumerate(step):
      if not re.fullmatch(r"(\S*/)?python[0-9.]*", word):
        continue
      installs_uv = (step[:5] == ["python3", "-m", "pip", "install", "--user"]
                     and step[-1] == "uv")
      assert word == tpu.PYTHON or i == 0 and (
          installs_uv or step[:3] == ["python3", "-m", "uv"]), step


def launch(env, tmp_path, *extra):
  return run_module("experiments.launch", "--tpu=rt", "--zone=z",
                    "--project=p", "--accelerator_type=v4-32", "--create",
                    "--delete_after", "--skip_preflight",
                    f"--launch_logs={tmp_path / 'logs'}",
                    *extra, "--", "--config=configs/default.py:tpu",
                    env=env, timeout=120)


@pytest.mark.slow
def test_whole_flow_create_copy_run_delete(fake_gcloud, tmp_path):
  env, calls, done = fake_gcloud
  result = launch(env, tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  steps = [tuple(c[2:4]) for c in calls()]  # argv after "gcloud compute tpus"
  assert steps[0] == ("tpu-vm", "create") and steps[-1] == ("tpu-vm", "delete")
  assert steps[1] == ("tpu-vm", "scp") and steps[2] == ("tpu-vm", "ssh")
  assert sorted(os.listdir(done)) == ["0", "1", "2", "3"]  # all 4 workers ran
  remotes = [c[-1].removeprefix("--command=") for c in calls() if c[3] == "ssh"]
  for remote in remotes:
    assert_python_is_the_venvs(remote)
  setup, runs = shell_steps(remotes[0]), remotes[1:]
  assert tpu.PYTHON == f"{tpu.VENV}/bin/python"
  venv = next(s for s in setup if s[:4] == ["python3", "-m", "uv", "venv"])
  version = venv[venv.index("--python") + 1]
  assert tuple(map(int, version.split("."))) >= (3, 11)  # what rtjax needs
  assert venv[-1] == tpu.VENV
  install = next(s for s in setup if s[3:5] == ["pip", "install"])
  assert install[:3] == ["python3", "-m", "uv"] and ".[tpu]" in install
  assert install[install.index("--python") + 1] == tpu.PYTHON
  assert len(runs) == 4 and all(
      shell_steps(r)[1][:3] == [tpu.PYTHON, "-m", "experiments.main"]
      for r in runs)
  logs = sorted(os.listdir(tmp_path / "logs"))
  assert [f"worker-{i}.log" for i in range(4)] == [l for l in logs if l.startswith("worker")]
  with tarfile.open(tmp_path / "logs" / tpu.ARCHIVE) as tar:
    assert "rtjax/trainer.py" not in tar.getnames()
    assert "rtjax/train/trainer.py" in tar.getnames()


@pytest.mark.slow
def test_failing_worker_stops_the_rest_and_is_named(fake_gcloud, tmp_path):
  env, calls, done = fake_gcloud
  env.update(FAKE_GCLOUD_FAIL_WORKER="1", FAKE_GCLOUD_RUN_SECONDS="60")
  result = launch(env, tmp_path)
  assert result.returncode == 1
  assert result.stderr.startswith("error: worker 1 failed with exit code 3")
  assert "Traceback" not in result.stderr
  assert os.listdir(done) == []  # the others were stopped, not waited for
  stop = [c for c in calls() if "--command=" + tpu.STOP_SCRIPT in c]
  assert stop and "--worker=all" in stop[0]
  # It ends what holds the TPU's device files, not whatever matches a name.
  assert "/dev/accel*" in tpu.STOP_SCRIPT and "/dev/vfio/*" in tpu.STOP_SCRIPT
  assert not any("pkill" in word for call in calls() for word in call)
  assert tpu.STOP_SCRIPT in calls()[2][-1]  # setup frees the TPU the same way
  assert calls()[-1][2:4] == ["tpu-vm", "delete"]  # deleted even on failure


# ---- the pre-flight check --------------------------------------------------

def test_preflight_reads_the_experiment_from_the_launch_arguments():
  from rtjax.target import preflight
  config = preflight.experiment_config([
      "--config=configs/compress.py:tiny", "--config.train.batch_size=32",
      "--workdir=gs://b/r", "--multihost"])
  assert config.train.batch_size == 32
  assert preflight._dtypes(config) == ("float32", "int8")  # its int8 stage
  assert preflight._dtypes(preflight.experiment_config(
      ["--config=configs/default.py"])) == ("float32",)
  with pytest.raises(errors.ConfigError, match="give no --config"):
    preflight.experiment_config(["--workdir=gs://b/r"])


# With libtpu (the [tpu] extra):

def preflight(*main_args):
  pytest.importorskip("libtpu", reason="needs the rtjax[tpu] extra")
  return run_module("experiments.launch", "--tpu=rt", "--zone=z",
                    "--project=p", "--accelerator_type=v5litepod-8",
                    "--dry_run", "--", *main_args, "--workdir=gs://b/r")


@pytest.mark.slow
def test_dry_run_prints_the_preflight_table_then_the_plan():
  result = preflight("--config=configs/default.py:tiny")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  rows = [line.split(" | ") for line in lines if line.startswith("# | resnet")]
  assert [tuple(r[3:7]) for r in rows] == [
      ("serve float32", "1", "1×8", "yes"), ("serve float32", "256", "8×1", "yes"),
      ("train step float32", "64", "8×1", "yes")]
  assert all(r[7].endswith("of 16 GiB") for r in rows)
  assert "predicted (XLA:TPU cost model, uncalibrated)" in result.stdout
  first_command = next(i for i, l in enumerate(lines) if l.startswith("gcloud"))
  assert first_command > lines.index(next(l for l in lines if "resnet" in l))


@pytest.mark.slow
def test_weights_no_chip_holds_stop_the_launch_with_the_bytes():
  # 4.9e9 float32 weights (19.6 GB): split 8 ways they serve one row, but
  # the train step and batch 256 keep a whole copy on every 16 GiB chip.
  result = preflight("--config=configs/mnist1d.py:mlp",
                     "--config.model.args.hidden=(70000,70000)",
                     "--config.train.batch_size=256")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  line = result.stderr.splitlines()[-1]  # after jax's INFO lines
  assert line.startswith("error: pre-flight: serve (float32, batch 256")
  assert "exceeds available HBM" in line and "--skip_preflight" in line
  assert "gcloud" not in result.stdout  # no plan after a refusal
  assert "| mlp | v5litepod-8 | serve float32 | 1 | 1×8 | yes |" in result.stdout
