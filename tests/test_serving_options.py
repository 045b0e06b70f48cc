"""Serving options: one precedence rule (flag > checkpoint's record for this
kind of device > that kind's default) and bf16 serving on every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtjax.infer import CompiledModel, fold_batchnorm, options, precision
from rtjax.models import create_model

RECORDED = {"serving": {"cpu": {"conv_lowering": "conv1:4x4",
                                "embed_weights": True},
                        "tpu": {"dtype": "bfloat16", "round_widths_to": 128}}}


def test_flag_beats_checkpoint_beats_device_default():
  on_cpu = options.resolve({"embed_weights": False, "dtype": None}, RECORDED,
                           "cpu")
  assert on_cpu["embed_weights"] is False  # the flag, over the record
  assert on_cpu["conv_lowering"] == "conv1:4x4"  # the record for cpu
  assert on_cpu["dtype"] == "float32"  # None is "not given": the default
  assert on_cpu["source"] == {"embed_weights": "flag",
                              "conv_lowering": "checkpoint",
                              "dtype": "default", "round_widths_to": "default",
                              "dot_kernels": "default",
                              "kv_cache": "default"}
  # A CPU-tuned lowering never reaches a TPU or GPU: their own record or
  # default applies there.
  on_tpu = options.resolve({}, RECORDED, "tpu")
  assert on_tpu["conv_lowering"] == "xla" and on_tpu["embed_weights"] is False
  assert on_tpu["dtype"] == "bfloat16" and on_tpu["round_widths_to"] == 128
  assert options.resolve({}, RECORDED, "cuda")["conv_lowering"] == "xla"
  assert options.resolve({}, None, "gpu") == options.resolve({}, {}, "gpu")
  with pytest.raises(ValueError, match="unknown serving option"):
    options.resolve({"lowering": "xla"}, None, "cpu")


def test_compiled_model_applies_the_rule():
  model = create_model("lenet5", {"num_classes": 10, "input_shape": [16, 16, 1],
                                  "conv_channels": [2, 4], "hidden": [8, 8]})
  served = CompiledModel(model, (16, 16, 1), batch_sizes=(2,),
                         metadata=RECORDED, dtype="bfloat16")
  assert served.options["source"]["dtype"] == "flag"
  assert served.conv_lowering[2] == {"conv1": (4, 4)}  # from the record
  assert served.embed_weights and served.dtype == jnp.bfloat16
  with pytest.raises(Exception, match="serving dtype 'float16'"):
    CompiledModel(model, (16, 16, 1), batch_sizes=(2,), dtype="float16")


def test_dot_kernels_xla_takes_ynnpack_out_of_the_executable():
  """dot_kernels is a per-executable compiler option: "xla" leaves no
  YNNPACK fusion in the program, with the same outputs."""
  model = create_model("cnn1d", {"num_classes": 10, "input_shape": [40, 1],
                                 "channels": [16, 16, 16]})
  x = np.random.default_rng(0).normal(size=(8, 40, 1)).astype(np.float32)
  library = CompiledModel(model, (40, 1), batch_sizes=(8,))
  own = CompiledModel(model, (40, 1), batch_sizes=(8,), dot_kernels="xla")
  if "__ynn_fusion" not in library.executables[8].as_text():
    pytest.skip("this jaxlib's CPU compiler does not use YNNPACK")
  assert library.options["dot_kernels"] == "ynnpack"  # the CPU default
  assert "__ynn_fusion" not in own.executables[8].as_text()
  np.testing.assert_allclose(own(x), library(x), atol=1e-5)
  assert options.compiler_options("xla", "tpu") == {}
  with pytest.raises(ValueError, match="dot_kernels 'ynnpack' on tpu"):
    options.compiler_options("ynnpack", "tpu")


FAMILIES = {  # small members of every family
    "lenet5": ([16, 16, 3], {"conv_channels": [4, 8], "hidden": [16, 16]}),
    "resnet": ([8, 8, 1], {"stem_width": 8, "stage_widths": [8, 16]}),
    "vit": ([8, 8, 1], {"embed_dim": 16, "depth": 1, "num_heads": 2,
                        "head_dim": 8, "mlp_dim": 16}),
    "mlp": ([40, 1], {"hidden": [16, 16]}),
    "cnn1d": ([16, 1], {"channels": [8, 8, 8]}),
    "gru": ([8, 1], {"hidden": [6], "bidirectional": True, "head": "all"}),
    "lstm": ([8, 1], {"hidden": [6], "bidirectional": False, "head": "last"}),
    "transformer1d": ([8, 1], {}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_serving_is_bf16_and_close_to_f32(family):
  shape, args = FAMILIES[family]
  model = create_model(family, {"num_classes": 10, "input_shape": shape,
                                **args}, seed=0)
  x = np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32)
  folded = fold_batchnorm(model)
  bf16 = CompiledModel(model, shape, batch_sizes=(4,), dtype="bfloat16")
  # The compiled program holds bf16 weights (XLA's CPU may widen a bf16
  # convolution to f32 inside; TPUs and GPUs run them as they are).
  assert "bf16[" in bf16.executables[4].as_text()
  # As lowered: every Linear/Conv product takes bf16 operands and sums in
  # f32 (stablehlo dot_general/convolution: bf16 x bf16 -> f32).
  served = precision.with_dtype(folded, jnp.bfloat16)
  lowered = jax.jit(lambda v: served(v)).lower(
      jnp.asarray(x, jnp.bfloat16)).as_text()
  products = [line for line in lowered.splitlines()
              if "stablehlo.dot_general" in line
              or "stablehlo.convolution" in line]
  assert products and any(line.count("bf16>") >= 2
                          and line.rstrip().endswith("xf32>")
                          for line in products), products[:2]
  reference, out = np.asarray(folded(x)), bf16(x)
  assert out.dtype == np.float32  # the host boundary stays f32
  scale = np.abs(reference).max()
  np.testing.assert_allclose(out, reference, atol=0.05 * scale)
  assert not np.array_equal(out, reference)  # really computed differently


def test_bf16_refuses_int8_models():
  from rtjax.compress import quantize
  from rtjax.models import quantized
  shape, args = FAMILIES["mlp"]
  model = create_model("mlp", {"num_classes": 10, "input_shape": shape,
                               **args})
  qspec = quantized.quantization_spec("w8a8", mode="ptq")
  int8 = quantize.int8_model(model, qspec, shape)
  assert precision.is_float_model(model) and not precision.is_float_model(int8)
  with pytest.raises(Exception, match="quantized"):
    CompiledModel(int8, shape, batch_sizes=(2,), dtype="bfloat16")


def test_bf16_serves_a_model_widened_for_serving():
  """round_widths_to pads with zero units (host arrays) before the bf16
  copy: both options together give the float model's outputs."""
  from rtjax.models.registry import full_args
  args = {"num_classes": 10, "input_shape": [32, 32, 3]}
  model = create_model("lenet5", args)
  spec = {"name": "lenet5", "args": full_args(type(model), args)}
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  reference = CompiledModel(model, [32, 32, 3], batch_sizes=(2,))(x)
  served = CompiledModel(model, [32, 32, 3], batch_sizes=(2,),
                         dtype="bfloat16", round_widths_to=8, spec=spec)
  assert served.options["round_widths_to"] == 8
  np.testing.assert_allclose(served(x), reference,
                             atol=0.05 * np.abs(reference).max())
