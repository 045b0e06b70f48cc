"""Every user error is one line: each entry point refuses a wrong flag, config
key, value, path or file with exit code 2 and one `error: ...` line on stderr
that names the offending thing, no traceback, and leaves existing checkpoints
untouched.

The commands are real subprocesses (`python -m experiments.X ...`). Each one
spends most of its time importing jax, so they all run concurrently, once per
session, in the `refused` fixture (the session's tiny run, `trained`,
provides the real checkpoint, copied per command); each test checks one
command's outcome.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import built_once, run_module

pytestmark = pytest.mark.slow  # a dozen commands, each a fresh process


@dataclasses.dataclass
class Case:
  """One refused command: its module and flags; `names` are strings the
  error line must contain; `checkpoint` asks for a private copy of the tiny
  trained workdir, substituted for {ckpt} in the flags."""
  module: str
  args: tuple[str, ...]
  names: tuple[str, ...]
  checkpoint: bool = False


def _main(*args: str) -> tuple[str, ...]:
  return ("--workdir={tmp}/workdir", "--noreport", *args)


CASES = {
    # 1: a misspelled key in a --config.* override.
    "misspelled_config_key": Case(
        "experiments.main",
        _main("--config=configs/default.py:tiny", "--config.trian.num_steps=5"),
        ("trian",)),
    # 2: a config file that does not exist.
    "missing_config_file": Case(
        "experiments.main", _main("--config=configs/nope.py"),
        ("configs/nope.py",)),
    "missing_config_file_with_override": Case(
        "experiments.main",
        _main("--config=configs/nope.py", "--config.train.num_steps=5"),
        ("configs/nope.py",)),
    # 3: a variant the config file does not have.
    "unknown_config_variant": Case(
        "experiments.main", _main("--config=configs/default.py:huge"),
        ("huge",)),
    # 4: a value out of range.
    "bad_learning_rate": Case(
        "experiments.main",
        _main("--config=configs/default.py:tiny",
              "--config.train.learning_rate=-1"),
        ("train.learning_rate", "-1")),
    # 5: a compression stage's value out of range.
    "bad_stage_value": Case(
        "experiments.main",
        _main("--config=configs/compress.py:tiny",
              "--config.stage.structured.keep_fraction=1.5"),
        ("stage.structured.keep_fraction", "1.5")),
    # 6: cifar10 from a directory that does not exist.
    "cifar10_missing_dir": Case(
        "experiments.main",
        _main("--config=configs/lenet5.py", "--config.data.name=cifar10",
              "--config.data.dir={tmp}/no_such_cifar_dir"),
        ("no_such_cifar_dir", "data.dir")),
    # 7: cifar10 with one garbage batch file among the six expected.
    "cifar10_corrupt_batch": Case(
        "experiments.main",
        _main("--config=configs/lenet5.py", "--config.data.name=cifar10",
              "--config.data.dir={tmp}/cifar"),
        ("data_batch_2",)),
    # 8: a batch size that is not positive.
    "bench_batch_size_zero": Case(
        "experiments.bench",
        ("--checkpoints={ckpt}", "--batch_sizes=0", "--iters=1", "--warmup=0"),
        ("--batch_sizes", "0"), checkpoint=True),
    # 9: a directory that holds no checkpoint, and a path that does not exist.
    "predict_empty_dir": Case(
        "experiments.predict",
        ("--checkpoint={tmp}/empty_dir", "--output={tmp}/predict_out"),
        ("empty_dir",)),
    "predict_missing_path": Case(
        "experiments.predict",
        ("--checkpoint={tmp}/no_such_checkpoint", "--output={tmp}/predict_out"),
        ("no_such_checkpoint",)),
    # 10: an accelerator type Cloud TPU does not have.
    "launch_unknown_accelerator": Case(
        "experiments.launch",
        ("--tpu=x", "--zone=z", "--project=p", "--accelerator_type=v9-8",
         "--dry_run"),
        ("v9-8",)),
    # 12: bad flag values of predict, on a real checkpoint.
    "predict_bad_mesh": Case(
        "experiments.predict",
        ("--checkpoint={ckpt}", "--output={tmp}/predict_out", "--mesh=data:0"),
        ("data:0",), checkpoint=True),
    "predict_bad_conv_lowering": Case(
        "experiments.predict",
        ("--checkpoint={ckpt}", "--output={tmp}/predict_out",
         "--conv_lowering=conv1:axb"),
        ("--conv_lowering", "conv1:axb"), checkpoint=True),
    # 13: a workdir holding another architecture's checkpoint.
    "workdir_of_another_architecture": Case(
        "experiments.main",
        ("--config=configs/default.py:tiny", "--config.model.args.stem_width=8",
         "--workdir={ckpt}", "--noreport"),
        ("stem_width", "{ckpt}"), checkpoint=True),
    # 14: a flag no command defines.
    "unknown_flag": Case("experiments.main", ("--nope",), ("nope",)),
}

def tree_hash(directory) -> str:
  """Hash of every file's relative path and contents under `directory`."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, directory).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def write_cifar_dir(directory) -> None:
  """The six CIFAR-10 python batch files, data_batch_2 garbage."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    with open(os.path.join(directory, name), "wb") as f:
      pickle.dump({b"labels": [i % 10 for i in range(20)],
                   b"data": rng.integers(0, 256, (20, 3072), np.uint8)}, f)
  with open(os.path.join(directory, "data_batch_2"), "wb") as f:
    f.write(b"\x80\x04garbage, not a pickle" * 10)


@dataclasses.dataclass
class Outcome:
  result: subprocess.CompletedProcess | None
  case: Case
  tmp: str
  ckpt: str | None = None
  hash_before: str | None = None
  error: BaseException | None = None

  def fill(self, text: str) -> str:
    return text.format(tmp=self.tmp, ckpt=self.ckpt)


@pytest.fixture(scope="session")
def trained_workdir(trained):
  """A real checkpoint: conftest's tiny run, read and copied, never changed."""
  return str(trained[1])


@pytest.fixture(scope="session")
def refused(tmp_path_factory, trained_workdir):
  """{case name: Outcome}: every case's command run once, concurrently, the
  checkpoint cases each on its own copy of the trained workdir."""
  return built_once(tmp_path_factory, "refused", lambda: _refuse_all(
      tmp_path_factory, trained_workdir))


def _refuse_all(tmp_path_factory, trained_workdir):
  outcomes: dict[str, Outcome] = {}
  for name, case in CASES.items():
    outcomes[name] = Outcome(None, case, str(tmp_path_factory.mktemp(name)))
  write_cifar_dir(os.path.join(outcomes["cifar10_corrupt_batch"].tmp, "cifar"))
  os.makedirs(os.path.join(outcomes["predict_empty_dir"].tmp, "empty_dir"))

  def submit(pool, outcome):
    return pool.submit(run_module, outcome.case.module,
                       *[outcome.fill(a) for a in outcome.case.args],
                       timeout=240)

  assert os.listdir(os.path.join(trained_workdir, "checkpoints"))
  for outcome in outcomes.values():
    if outcome.case.checkpoint:
      outcome.ckpt = os.path.join(outcome.tmp, "workdir")
      shutil.copytree(trained_workdir, outcome.ckpt)
      outcome.hash_before = tree_hash(os.path.join(outcome.ckpt,
                                                   "checkpoints"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {name: submit(pool, o) for name, o in outcomes.items()}
    for name, future in futures.items():
      try:
        outcomes[name].result = future.result()
      except Exception as e:  # a timeout: reported by that case's test
        outcomes[name].error = e
  return outcomes


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_one_line(refused, name):
  outcome = refused[name]
  if outcome.error is not None:
    raise outcome.error
  result = outcome.result
  tail = result.stderr[-3000:]
  assert result.returncode == 2, tail
  assert not [l for l in result.stderr.splitlines() if "Traceback" in l], tail
  lines = error_lines(result.stderr)
  assert len(lines) == 1, tail
  for thing in outcome.case.names:
    assert outcome.fill(thing) in lines[0], lines[0]
  if outcome.ckpt is not None:  # the refused command changed no checkpoint
    assert tree_hash(os.path.join(outcome.ckpt, "checkpoints")) == \
        outcome.hash_before
  if "predict" in outcome.case.module:  # and wrote no output
    assert not os.path.exists(os.path.join(outcome.tmp, "predict_out"))


def test_refused_commands_leave_no_checkpoint(refused):
  """Commands refused for their config wrote no checkpoint into --workdir."""
  for name, outcome in refused.items():
    if outcome.case.module == "experiments.main" and not outcome.case.checkpoint:
      assert not os.path.exists(
          os.path.join(outcome.tmp, "workdir", "checkpoints")), name


def test_wrong_input_shape_is_an_input_error(refused, trained_workdir):
  """No command takes inputs of a user-chosen shape; the served model's API
  refuses them with an InputError (a UserError) naming both shapes."""
  from rtjax.errors import InputError, UserError
  from rtjax.infer import CompiledModel
  model = CompiledModel.from_checkpoint(trained_workdir, batch_sizes=(1,))
  assert model.input_shape == (8, 8, 1)
  ok = model(np.zeros((1, 8, 8, 1), np.float32))
  assert ok.shape == (1, 10)
  for wrong in (np.zeros((1, 32, 32, 3)), np.zeros((1, 8, 8)),
                np.zeros((8, 8, 1))):
    with pytest.raises(InputError) as raised:
      model(wrong)
    assert isinstance(raised.value, UserError)
    message = str(raised.value)
    assert str(wrong.shape[1:]) in message and "(8, 8, 1)" in message
    assert "\n" not in message
