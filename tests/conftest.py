"""Shared fixtures: small configs that train in seconds on 2 CPU cores."""

import atexit
import fcntl
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the session, shared by this
# process, pytest-xdist's workers (they inherit the environment of the
# process that starts them) and every command the tests start (jax reads
# these variables when it is imported): each distinct program compiles once
# per session, which takes about a third off the suite. It starts empty
# every session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="rtjax-tests-xla-cache-")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Tests check what programs compute, never how fast (benchmarks in
# experiments/ measure that, compiled as served), and most of their
# programs run a handful of times: compiled without LLVM's optimizations
# they take about a third less CPU time (a tiny pipeline and a tiny search
# side by side: 137 -> 95 CPU s). Commands the tests start inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, (
      os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0")))

# The host readied for libtpu (the [tpu] extra) as every entry point readies
# it, before any test starts a jax backend; the commands tests start inherit
# it.
import experiments  # noqa: E402,F401


def built_once(tmp_path_factory, name: str, build):
  """A fixture's value built once per session, whichever pytest-xdist worker
  asks first: the others wait on a lock and read it back (pickled). Without
  it every worker builds each session fixture its tests use (the tiny run,
  the family checkpoints), and each module fixture whose tests worksteal
  spread over workers (a tiny search, a pipeline: tens of CPU seconds
  each). Paths in the value lie under the session's temporary root, which
  every worker reads."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return build()
  root = tmp_path_factory.getbasetemp().parent
  stored = root / f"{name}.pickle"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if stored.exists():
      return pickle.loads(stored.read_bytes())
    value = build()
    stored.write_bytes(pickle.dumps(value))
    return value


@pytest.fixture
def tiny_config():
  """configs/default.py:tiny, as `python -m experiments.main` would load it."""
  from configs import default
  return default.get_config("tiny")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """One tiny default run, shared by every test that only reads its outputs:
  (config, workdir, TrainResult)."""
  def build():
    from configs import default
    from rtjax.train import train_and_evaluate
    config = default.get_config("tiny")
    workdir = tmp_path_factory.mktemp("tiny_run")
    return config, workdir, train_and_evaluate(config, workdir)
  return built_once(tmp_path_factory, "trained", build)


def free_port() -> int:
  """A localhost port nobody listens on, for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_module(module: str, *args: str, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repository root, capturing output."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def untrained_checkpoints(tmp_path_factory):
  """LeNet-5 and ViT as their configs build them, saved untrained: for tests
  of what serving computes from a checkpoint, not of what training learnt
  (family_checkpoints trains them, for seconds each): {name: workdir}."""
  def build():
    from configs import lenet5, vit
    from rtjax import models
    from rtjax.checkpoint import save_complete_step
    from rtjax.data import dataset_spec
    from rtjax.train.trainer import model_spec
    paths = {}
    for name, module in (("lenet5", lenet5), ("vit", vit)):
      config = module.get_config()
      spec = model_spec(config.model, dataset_spec(config.data))
      model = models.create_model(spec["name"], spec["args"], seed=0)
      paths[name] = tmp_path_factory.mktemp(f"untrained_{name}")
      save_complete_step(model, {"model": spec}, paths[name])
    return paths
  return built_once(tmp_path_factory, "untrained_checkpoints", build)


@pytest.fixture(scope="session")
def family_checkpoints(trained, tmp_path_factory):
  """A short-trained checkpoint of each model family: {name: workdir}."""
  def build():
    from configs import lenet5, vit
    from rtjax.train import train_and_evaluate
    paths = {"resnet": trained[1]}
    for name, module in (("lenet5", lenet5), ("vit", vit)):
      config = module.get_config()
      config.train.num_steps, config.train.warmup_steps = 20, 5
      workdir = tmp_path_factory.mktemp(name)
      train_and_evaluate(config, workdir)
      paths[name] = workdir
    return paths
  return built_once(tmp_path_factory, "family_checkpoints", build)
