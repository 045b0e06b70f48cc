"""Comparing checkpoints: metrics, Pareto front, errors naming the culprit,
and the reports (markdown, JSON, CSV, PNG)."""

import json
import shutil

import numpy as np
import pytest

from rtjax import compare
from tests.conftest import run_module


def test_agreement_and_kl_of_a_checkpoint_with_itself():
  logits = np.random.default_rng(0).normal(size=(50, 10))
  assert compare.agreement(logits, logits) == 1.0
  assert compare.mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
  other = logits + np.random.default_rng(1).normal(size=logits.shape)
  assert compare.agreement(logits, other) < 1.0
  assert compare.mean_kl(logits, other) > 0.0


def test_pareto_front_on_a_hand_made_set():
  # (accuracy, p99 ms): a fast/inaccurate, b dominated by c, c, d accurate/slow,
  # e equal to c's latency but less accurate.
  points = [(0.90, 1.0), (0.95, 3.0), (0.96, 2.0), (0.99, 5.0), (0.93, 2.0)]
  assert compare.pareto_front(points) == [0, 2, 3]
  rows = [{"name": n, "accuracy": a, "p99": l}
          for n, (a, l) in zip("abcde", points)]
  assert compare.best_under_budget(rows, 2.5, "p99")["name"] == "c"
  assert compare.best_under_budget(rows, 0.5, "p99") is None


@pytest.mark.slow
def test_compare_cli_reports_a_run(family_checkpoints, tmp_path):
  from rtjax.checkpoint import load_checkpoint
  resnet = family_checkpoints["resnet"]
  earlier = resnet / "checkpoints" / "100"  # the same run, 50 steps before
  out, results = tmp_path / "out", tmp_path / "results" / "table.md"
  result = run_module("experiments.compare",
                      f"--checkpoints={resnet},{earlier}", "--batch_sizes=1,8",
                      "--iters=10", "--latency_budget_ms=1000",
                      "--dtype=bfloat16",
                      f"--output_dir={out}", f"--results={results}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((out / "compare.json").read_text())
  first, second = summary["rows"]
  assert first["agreement"] == 1.0 and first["kl"] == 0.0  # the reference
  assert second["kl"] > 1e-4 and 0.5 < second["agreement"] <= 1.0
  # The same test accuracy the run recorded when it evaluated itself.
  recorded = load_checkpoint(resnet)[1]["metrics"]["test"]["accuracy"]
  assert first["accuracy"] == pytest.approx(recorded, abs=1e-6)
  assert first["speedup_b1"] == 1.0 and second["p99_ms_b8"] > 0
  assert first["bytes"] > 0 and first["dtypes"] == ["float32"]
  # Served in bf16: the served program's own accuracy, and its change.
  assert first["serving_dtype"] == "bfloat16"
  assert first["served_accuracy_delta"] == pytest.approx(
      first["served_accuracy"] - first["accuracy"])
  assert abs(first["served_accuracy_delta"]) <= 0.05
  assert summary["best_under_budget"] in (first["name"], second["name"])
  png = (out / "compare.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  assert "| stage |" in (out / "compare.md").read_text()
  assert "| bfloat16: " in (out / "compare.md").read_text()
  assert (out / "compare.csv").read_text().startswith("name,")
  stamped = results.read_text()
  assert stamped.startswith("Command: `") and "experiments.compare" in stamped
  assert "git commit:" in stamped and "jax " in stamped and "| stage |" in stamped
  assert results.with_suffix(".png").read_bytes() == png


@pytest.mark.slow
def test_errors_name_the_culprit(family_checkpoints, tmp_path):
  resnet, lenet = family_checkpoints["resnet"], family_checkpoints["lenet5"]
  half = tmp_path / "c" / "checkpoints" / "150.orbax-checkpoint-tmp-7"
  shutil.copytree(resnet / "checkpoints" / "150", half)
  for paths, message in [([resnet, tmp_path], "holds no finished rtjax checkpoint"),
                         ([resnet, lenet], "cannot share a dataset"),
                         ([half], "half-written")]:
    with pytest.raises(compare.CompareError, match=message):
      compare.load_all(paths)
  loaded = compare.load_all([resnet])
  with pytest.raises(compare.CompareError, match="unknown reference 'nope'"):
    compare.compare(loaded, None, reference="nope")
  # The command line turns them into one line and exit code 2.
  result = run_module("experiments.compare", f"--checkpoints={resnet},{lenet}",
                      "--iters=2", f"--output_dir={tmp_path / 'o'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "cannot share a dataset" in result.stderr
