"""configs/compress_mnist1d.py: its tiny variant end to end, and a GRU
checkpoint through structured pruning, int8, compare, bench, jax.export and
8 devices with no special flags; distilled students paired with their
from-scratch twins."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import compress_mnist1d
from rtjax import compare
from rtjax.checkpoint import checkpoint_dataset, load_checkpoint
from rtjax.data import Split
from rtjax.infer import CompiledModel
from rtjax.infer.export import export_serving
from rtjax.pipeline import run_pipeline
from tests.conftest import built_once, run_module


@pytest.fixture(scope="module")
def gru_chain(tmp_path_factory):
  """The tiny pipeline's workdir: GRU -> structured GRU, int8 GRU."""
  def build():
    workdir = tmp_path_factory.mktemp("compress_mnist1d")
    run_pipeline(compress_mnist1d.get_config("tiny"), workdir)
    return workdir
  return built_once(tmp_path_factory, "gru_chain", build)


def test_full_config_pairs_every_student_with_a_twin():
  config = compress_mnist1d.get_config()
  distilled = [n for n in config.stages if config.stage[n].type == "distill"
               and config.stage[n].model.name == "cnn1d"]
  assert len(distilled) == 6  # two sizes x three seeds
  for name in distilled:
    twin = config.stage[name.replace("_distill_", "_scratch_")]
    assert twin.type == "train"
    assert twin.model == config.stage[name].model
    assert twin.train == config.stage[name].train  # same recipe and seed


@pytest.mark.slow
def test_gru_goes_through_every_tool(gru_chain, tmp_path):
  gru, gru_meta = load_checkpoint(gru_chain / "gru")
  smaller, smaller_meta = load_checkpoint(gru_chain / "gru_structured")
  int8, int8_meta = load_checkpoint(gru_chain / "gru_int8")
  assert smaller_meta["model"]["args"]["hidden"] == [16]  # half of 32 units
  assert smaller_meta["flops_per_example"] < 0.5 * gru_meta["flops_per_example"]
  assert int8_meta["model"]["quantization"]["scheme"] == "w8a8"
  assert "int8" in {str(np.asarray(x).dtype)
                    for x in jax.tree.leaves(nnx.state(int8))}
  assert int8_meta["seed"] == 0 and smaller_meta["train"]["num_steps"] == 20

  # compare: every checkpoint rebuilt and timed side by side
  paths = [gru_chain / n for n in ("gru", "gru_structured", "gru_int8")]
  test = checkpoint_dataset(int8_meta).test
  split = Split(test.images[:64], test.labels[:64])
  rows = compare.compare(compare.load_all(paths), split, batch_sizes=(1,),
                         iters=5, warmup=1)
  assert [r["name"] for r in rows] == ["gru", "gru_structured", "gru_int8"]
  assert all(r["p99_ms_b1"] > 0 for r in rows)

  # jax.export: the artifact computes what the served model computes
  images = split.images[:5]
  artifact = export_serving(gru, [40, 1], tmp_path / "gru.jax", gru_meta)
  restored = jax.export.deserialize(bytearray(artifact.read_bytes()))
  served = CompiledModel(gru, [40, 1], batch_sizes=(5,))(images)
  np.testing.assert_allclose(np.asarray(restored.call(images)), served,
                             atol=1e-5)

  # bench, streaming the first checkpoint step by step as well
  result = run_module("experiments.bench", f"--checkpoints={paths[0]}",
                      "--batch_sizes=1", "--iters=10", "--warmup=2",
                      "--stream_chunks=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "per step" in result.stdout

  # data-parallel serving on 8 simulated devices equals one device
  result = run_module("tests.sharded_inference", "--meshes=data_parallel",
                      "--float_only", str(paths[0]))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report[f"{paths[0]}:float"]["data_parallel"]["max_abs_diff"] <= 1e-5


def _row(name, stage_type, seed, accuracy, arch="cnn8", recipe="r"):
  return {"name": name, "stage_type": stage_type, "seed": seed,
          "accuracy": accuracy, "architecture": arch, "recipe": recipe,
          "model": "cnn1d"}


def test_distilled_students_are_paired_with_same_seed_twins():
  rows = [_row("teacher", "train", 0, 0.99, arch="teacher"),
          _row("d0", "distill", 0, 0.90), _row("d1", "distill", 1, 0.92),
          _row("s1", "train", 1, 0.89), _row("s0", "train", 0, 0.86),
          _row("other_recipe", "train", 0, 0.10, recipe="longer")]
  table = compare.distillation_vs_scratch(rows)
  line = next(l for l in table.splitlines() if l.startswith("| d0"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[:4] == ["d0, d1", "s0, s1", "cnn1d", "2"]
  assert cells[4:] == ["91.00 ± 1.00", "87.50 ± 1.50", "+3.50 ± 0.50"]
  assert compare.distillation_vs_scratch(rows[:3]) == ""  # no twin: no table
