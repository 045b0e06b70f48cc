"""The accelerator check runs on the CPU in tiny mode, so it cannot rot."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_device_check_tiny_on_cpu(trained, tmp_path):
  from experiments.device_check import families
  from rtjax.bench import device_check
  # The CNN and LeNet-5 (the ViT takes the same path, at twice the time).
  report = device_check.run(families(tiny=True, cnn_checkpoint=str(trained[1]))[:2],
                            tmp_path, batches=(2,), iters=3, warmup=1,
                            torch_compile=False)
  assert report["failures"] == [], report["failures"]
  rows = report["rows"]
  assert [r["family"].split()[0] for r in rows] == ["cnn", "lenet5"]
  for r in rows:
    assert all(r[f"{d}_p50_ms"] > 0 for d in device_check.DTYPES)
    assert 0 < r["drift"]["bfloat16"] <= device_check.REDUCED_TOLERANCE["bfloat16"]
    assert "onnxruntime" in r["peers_p50_ms"] or any(
        "ONNX Runtime" in n for n in report["notes"])
  table = device_check.table(rows)
  assert table.count("\n| ") == 3 and "| lenet5 (initialized) | 2 |" in table


@pytest.mark.slow
def test_device_check_script_runs_from_the_tree():
  """The shell script finds rtjax in the source tree (no install) and passes
  flags through: a bad one is one error line and exit code 2."""
  env = {**os.environ, "PYTHON": sys.executable,
         "RTJAX_WHEELS": "/nonexistent"}
  result = subprocess.run(["bash", "experiments/device_check.sh",
                           "--platform=quantum"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "--platform" in result.stderr
