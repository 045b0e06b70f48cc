"""experiments.optimize for a Cloud TPU slice that is not attached
(--target, with libtpu): a tiny search whose every latency is XLA:TPU's
estimate for the slice, whose options are a TPU's, and whose chosen
checkpoint records the slice and what was predicted there."""

import pytest

from rtjax.optimize.search import Settings, run_search
from tests.conftest import built_once
from tests.test_optimize import TINY, fake_clock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target_search(trained, tmp_path_factory):
  pytest.importorskip("libtpu", reason="needs the rtjax[tpu] extra")
  # One candidate, no sensitivity entries: the slice's compiles are the cost.
  settings = Settings(**{**TINY, "uniform": (0.5,), "keep_fractions": (),
                         "max_candidates": 1, "max_finalists": 1,
                         "latency_budget_ms": 0.0, "budget_of_parent": 2.0,
                         "target": "v5litepod-8"})
  def build():
    workdir = tmp_path_factory.mktemp("optimize_target")
    return workdir, run_search(trained[1], workdir, settings,
                               clock=fake_clock())
  return built_once(tmp_path_factory, "target_search", build)


def test_every_latency_is_the_slices_estimate(target_search):
  from rtjax.checkpoint import load_checkpoint
  from rtjax.models.stats import cost_analysis
  from rtjax.target import resolve
  from rtjax.target.executables import without_persistent_cache
  from rtjax.infer import CompiledModel
  workdir, summary = target_search
  for name, row in summary["final"].items():
    model, meta = load_checkpoint(row["path"])
    options = row["options"]
    assert options["embed_weights"] is False and options["dot_kernels"] == "xla"
    with without_persistent_cache():
      again = CompiledModel(model, meta["model"]["args"]["input_shape"], [8],
                            mesh=resolve("v5litepod-8").mesh(8),
                            spec=meta["model"], metadata=None, place=False,
                            **options)
    seconds = cost_analysis(again.executables[8])["optimal_seconds"]
    assert row["p_ms"] == row["p50_ms"] == pytest.approx(1e3 * seconds)
  assert summary["floor_ms"] == 0.0


def test_a_slices_options_are_a_tpus(trained):
  from rtjax.checkpoint import load_checkpoint
  from rtjax.optimize import serving
  model, meta = load_checkpoint(trained[1])  # widths 16 and 32
  grid = serving.option_grid(model, meta["model"], kind="tpu")
  assert {o["dot_kernels"] for o in grid} == {"xla"}  # no YNNPACK
  assert {o["embed_weights"] for o in grid} == {False}
  # Padded to the 128 lanes of a TPU's tiles (8 sublanes: already).
  assert {o["round_widths_to"] for o in grid} == {0, 128}
  assert {o["round_widths_to"] for o in serving.option_grid(
      model, meta["model"], kind="cpu")} == {0}
  assert grid[0] == {**grid[0], "dtype": "float32", "round_widths_to": 0}


def test_the_chosen_checkpoint_records_the_slice(target_search):
  from rtjax.checkpoint import load_checkpoint
  workdir, summary = target_search
  _, best = load_checkpoint(workdir / "best")
  predicted = best["done"]["serving_predicted"]
  assert predicted["target"] == "v5litepod-8"
  assert predicted["device"] == "TPU v5 lite"
  assert "predicted" in predicted["label"] and "uncalibrated" in predicted["label"]
  assert "serving_measured" not in best["done"]
  chosen = summary["final"][summary["chosen"]]
  assert best["serving"]["tpu"] == chosen["options"]
  assert predicted["p_ms"] == chosen["p_ms"]


def test_a_workdir_searched_for_a_slice_is_not_resumed_for_another(
    target_search, trained):
  from rtjax.errors import UserError
  workdir, _ = target_search
  with pytest.raises(UserError, match="holds a search for v5litepod-8, not "
                     "this host: give a new --workdir"):
    run_search(trained[1], workdir, Settings(**TINY))


def test_the_report_says_what_was_predicted(target_search):
  workdir, summary = target_search
  text = (workdir / "optimize.md").read_text()
  assert "**For v5litepod-8, not this host**" in text
  assert "## Audit: does it pay on v5litepod-8?" in text
  assert "estimated speedup (XLA:TPU)" in text
  finalists = text.split("## Finalists")[1].split("\n\n")[1]
  assert "p50" not in finalists and "p90" not in finalists
  assert "| est. ms |" in finalists


def test_a_slice_adds_candidates_cut_to_whole_lane_tiles():
  from rtjax.models import create_model
  from rtjax.optimize import candidates
  spec = {"name": "mlp", "args": {"num_classes": 10, "input_shape": [40],
                                  "hidden": [512, 100], "residual": False}}
  sens = {"groups": [], "int8": [], "blocks": []}
  plain = candidates.recipes(spec, sens, (0.375,), (), shallow=False)
  tiled = candidates.recipes(spec, sens, (0.375,), (), shallow=False,
                             lanes=128)
  assert [r["name"] for r in plain] == ["uniform37.5"]
  assert [r["name"] for r in tiled] == ["uniform37.5", "uniform37.5_lanes"]
  parent = create_model("mlp", spec["args"], 0)
  _, cut = candidates.build(plain[0], parent, spec)
  _, lanes = candidates.build(tiled[1], parent, spec)
  assert cut["args"]["hidden"] == [192, 38]
  assert lanes["args"]["hidden"] == [256, 100]  # 100 < one tile: all kept
  small = {**spec, "args": {**spec["args"], "hidden": [64, 32]}}
  assert len(candidates.recipes(small, sens, (0.5,), (), False, 128)) == 1
