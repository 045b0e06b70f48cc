"""rtjax.target: executables compiled for a TPU slice that is not attached.

Tile arithmetic, the table and target names run anywhere; compiling needs
libtpu (the [tpu] extra) and is skipped without it.
"""

import math

import pytest

from rtjax import target as target_lib
from rtjax.errors import LaunchError
from rtjax.target import layouts, table
from tests.conftest import run_module


def test_padded_elements_follow_each_tile_in_turn():
  # f32[256,40]{1,0:T(8,128)}: 40 columns on 128 lanes.
  assert layouts.padded_elements((256, 40), (0, 1), [(8, 128)]) == 256 * 128
  # Transposed order: dimension 0 (40) is minor, on the lanes.
  assert layouts.padded_elements((40, 256), (1, 0), [(8, 128)]) == 256 * 128
  # bf16 packs row pairs: (2,1) divides the (8,128) tile, no more padding.
  assert layouts.padded_elements((1, 40), (0, 1), [(8, 128), (2, 1)]) == 1024
  # A vector under a 2-D tile gains a leading 1.
  assert layouts.padded_elements((10,), (0,), [(8, 128)]) == 8 * 128
  tiles = layouts.ArrayTiles("w", "float32", (256, 40), (0, 1), ((8, 128),))
  assert tiles.data_share == pytest.approx(40 / 128)


HLO = """HloModule jit_forward, entry_computation_layout={...}

%fused_computation (param_0: f32[8,40]) -> f32[8,100] {
  %param_0 = f32[8,40]{1,0:T(8,128)} parameter(0)
  ROOT %inner = f32[8,100]{1,0:T(8,128)} add(%param_0, %param_0)
}

ENTRY %main.7 (Arg_0.1: f32[40,100], Arg_1.2: f32[8,40]) -> f32[8,100] {
  %Arg_0.1 = f32[40,100]{1,0:T(8,128)} parameter(0)
  %Arg_1.2 = f32[8,40]{1,0:T(8,128)} parameter(1)
  %fusion = f32[8,100]{1,0:T(8,128)} fusion(%Arg_1.2, %Arg_0.1), kind=kOutput
  %pair = (f32[8,100]{1,0:T(8,128)}, bf16[3,40]{1,0:T(8,128)(2,1)}) custom-call(%fusion)
  %gte = f32[8,100]{1,0:T(8,128)} get-tuple-element(%pair), index=0
  ROOT %copy = f32[100,8]{0,1:T(8,128)} copy(%gte)
}
"""


def test_activations_are_the_entry_computations_arrays():
  arrays = {a.name: a for a in layouts.activation_tiles(HLO)}
  # Parameters (weights), fused values and tuple plumbing are not counted.
  assert sorted(arrays) == ["copy", "fusion", "pair[0]", "pair[1]"]
  assert arrays["pair[1]"].tiles == ((8, 128), (2, 1))
  assert arrays["pair[1]"].padded_elements == 8 * 128
  # {0,1}: dimension 0 (100) is minor: 8 rows on sublanes, 100 on lanes.
  assert arrays["copy"].major_to_minor == (1, 0)
  assert arrays["copy"].data_share == pytest.approx(100 / 128)
  share = layouts.data_share([arrays["fusion"], arrays["pair[1]"]])
  assert share == pytest.approx((800 * 4 + 120 * 2) / (1024 * 4 + 1024 * 2))


def _row(family, dtype, batch, seconds, share, **extra):
  return {"family": family, "target": "v5litepod-1", "what": "serve",
          "dtype": dtype, "batch": batch, "mesh": {"data": 1, "model": 1},
          "compiled": True, "error": None, "compile_s": 0.5,
          "hbm_capacity": 16 * 2 ** 30, "hbm_bytes": 2 ** 20, "flops": 1e9,
          "bytes_accessed": 2 ** 20, "xla_estimate_s": seconds,
          "t_compute_s": 1e-6, "t_memory_s": 2e-6, "t_comm_s": 0.0,
          "roofline_s": 3e-6, "weights_data_share": 1.0,
          "activations_data_share": share, "data_share": share,
          "most_padded": "x f32[1] 1%",
          **extra}


def test_table_labels_predictions_and_keeps_refusals():
  refused = _row("big", "float32", 8, None, None, compiled=False,
                 error="RESOURCE_EXHAUSTED: exceeds available HBM")
  text = table.markdown_table([_row("a", "float32", 1, 1e-5, 0.3), refused])
  header = text.splitlines()[2]
  assert target_lib.PREDICTED in text
  predicted = [c for c in header.split(" | ") if "(pred.)" in c]
  assert len(predicted) == 8 and not any("measured" in c for c in predicted)
  assert "compile s (measured, this host)" in header
  assert "no: RESOURCE_EXHAUSTED: exceeds available HBM" in text
  assert "1 MiB of 16 GiB" in text


def test_lessons_name_call_bound_and_padding_bound_families():
  # t = fixed + rows x per_row through (1, 10 µs) and (256, 900 µs).
  per_row = 890 / 255
  assert table.fixed_shares(1, 10e-6, 256, 900e-6) == pytest.approx(
      ((10 - per_row) / 10, (10 - per_row) / 900))
  rows = [_row("tiny", "float32", 1, 10e-6, 0.9),
          _row("tiny", "float32", 256, 12e-6, 0.9),
          _row("tiny", "int8", 256, 6e-6, 0.9),
          _row("wide", "float32", 1, 10e-6, 0.2),
          _row("wide", "float32", 256, 900e-6, 0.2),
          _row("wide", "bfloat16", 256, 450e-6, 0.2)]
  lines = table.lessons(rows, "v5litepod-1", 1, 256).splitlines()
  tiny = next(line for line in lines if line.startswith("| tiny"))
  wide = next(line for line in lines if line.startswith("| wide"))
  assert "batch 1: call-bound; batch 256: call-bound |" in tiny
  assert tiny.endswith("| – | 2.00× |")  # no bf16 row; int8 halves the time
  assert ("batch 1: call-bound, padding-bound; batch 256: padding-bound |"
          in wide)
  assert wide.endswith("| 2.00× | – |")


def test_unknown_target_names_the_valid_ones():
  with pytest.raises(LaunchError, match="v5litepod-8"):
    target_lib.resolve("v5litepod-7")


def test_command_refuses_unknown_family_in_one_line():
  result = run_module("experiments.tpu_targets", "--families=cnn,resnet9",
                      timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: unknown --families ['resnet9']")
  assert "Traceback" not in result.stderr


# ---- with libtpu: real compiles for v5e -------------------------------------

@pytest.fixture(scope="module")
def tpu():
  pytest.importorskip("libtpu")
  from rtjax import accelerators
  accelerators.prepare_host(cpu_only=True)
  return target_lib.resolve


def _mlp(hidden):
  from rtjax.models import abstract_model
  args = {"num_classes": 10, "input_shape": [40], "hidden": list(hidden)}
  return abstract_model("mlp", args), args


def test_hbm_per_chip_is_the_arrays_padded_bytes(tpu):
  from rtjax.target.predict import hbm_per_chip
  model, args = _mlp((100, 100))
  [executable] = target_lib.serving(model, [40], tpu("v5litepod-1"), [8],
                                    ["float32"])
  memory = executable.compiled.memory_analysis()
  arguments = layouts.weight_tiles(executable.compiled)
  own = sum(math.prod(a.shape) * 4 for a in arguments)
  assert own == 4 * (40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
                     + 8 * 40)  # the MLP's weights and biases, 8 rows of 40
  padded = sum(a.padded_elements * 4 for a in arguments)
  assert memory.argument_size_in_bytes == padded > own
  assert memory.output_size_in_bytes == 8 * 128 * 4  # f32[8,10] in T(8,128)
  assert hbm_per_chip(executable.compiled) == (
      padded + 8 * 128 * 4 + memory.temp_size_in_bytes)


def test_padding_share_of_a_kernel_matches_a_hand_count(tpu):
  model, _ = _mlp((100, 100))
  [executable] = target_lib.serving(model, [40], tpu("v5litepod-1"), [8],
                                    ["float32"])
  kernels = {a.name: a for a in layouts.weight_tiles(executable.compiled)}
  kernel = next(a for name, a in kernels.items()
                if a.shape == (40, 100) and name.endswith("kernel"))
  assert kernel.tiles[0] == (8, 128)  # f32 on a v5e: 8 sublanes x 128 lanes
  lanes_dim = kernel.major_to_minor[-1]
  rows = kernel.shape[kernel.major_to_minor[-2]]
  lanes = kernel.shape[lanes_dim]
  hand = (40 * 100) / (math.ceil(rows / 8) * 8 * math.ceil(lanes / 128) * 128)
  assert kernel.data_share == pytest.approx(hand)
  assert hand < 1.0


def test_too_big_for_one_chip_refused_but_fits_split_over_the_model_axis(tpu):
  from rtjax.target.predict import hbm_per_chip
  model, _ = _mlp((70_000, 70_000))  # 4.9e9 float32 weights: 19.6 GB
  [alone] = target_lib.serving(model, [40], tpu("v5litepod-1"), [8],
                               ["float32"])
  assert alone.compiled is None
  assert "RESOURCE_EXHAUSTED" in alone.error and "hbm" in alone.error.lower()
  slice_ = tpu("v5litepod-8")
  [split] = target_lib.serving(model, [40], slice_, [8], ["float32"],
                               model_axis=8)
  assert split.error is None and split.mesh == {"data": 1, "model": 8}
  assert 19.6e9 / 8 < hbm_per_chip(split.compiled) < slice_.hbm_bytes


def test_serving_options_follow_the_target_not_the_host(tpu):
  from rtjax.infer import CompiledModel
  model, _ = _mlp((100, 100))
  target = tpu("v5litepod-1")
  cpu_choice = {"serving": {"cpu": {"dot_kernels": "ynnpack",
                                    "conv_lowering": "auto"}}}
  served = CompiledModel(model, [40], [8], mesh=target.mesh(8),
                         metadata=cpu_choice, place=False)
  assert served.compiler_options == {}
  assert served.options["conv_lowering"] == "xla"
  assert served.options["source"]["dot_kernels"] == "default"


def test_train_step_holds_the_optimizer_state(tpu):
  from configs import mnist1d
  train_config = mnist1d.get_config("mlp").train  # AdamW
  train_config.batch_size = 64
  spec = {"name": "mlp", "args": {"num_classes": 10, "input_shape": [40],
                                  "hidden": [100, 100]}}
  executable = target_lib.train(spec, train_config, tpu("v5litepod-1"))
  assert executable.error is None, executable.error
  weights = 4 * (40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10)
  # The weights and AdamW's two moments, besides the batch and the metrics.
  assert (executable.compiled.memory_analysis().argument_size_in_bytes
          >= 3 * weights)
  train_config.batch_size = 100  # the trainer splits rows over all 8 chips
  refused = target_lib.train(spec, train_config, tpu("v5litepod-8"))
  assert refused.compiled is None and "does not divide" in refused.error


def test_a_checkpoint_compiles_with_its_train_step(tpu, trained):
  config, workdir, _ = trained
  serve, train = target_lib.for_checkpoint(workdir, tpu("v5litepod-1"), [8],
                                           ["float32"])
  assert (serve.what, serve.error, serve.batch) == ("serve", None, 8)
  assert (train.what, train.error) == ("train step", None)
  assert train.batch == config.train.batch_size
