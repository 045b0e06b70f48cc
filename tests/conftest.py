"""Shared fixtures: small configs that train in seconds on 2 CPU cores."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  """configs/default.py:tiny, as `python -m experiments.main` would load it."""
  sys.path.insert(0, REPO)
  try:
    from configs import default
  finally:
    sys.path.remove(REPO)
  return default.get_config("tiny")


def run_module(module: str, *args: str, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repository root, capturing output."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})
