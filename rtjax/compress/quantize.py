"""int8 serving models from float ones with qwix (PtqProvider +
quantize_params: int8 values and scales), optionally with static activation
scales calibrated on a few batches. How a quantized model is wrapped (QAT or
PTQ, its spec) lives in rtjax.models.quantized, so checkpoints rebuild it."""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from rtjax.models.quantized import (ptq_shell, quantization_spec, rules,
                                    sample_input)


def calibrate(model: nnx.Module, spec: dict, input_shape,
              batches: Iterable[np.ndarray]) -> dict:
  """Static activation statistics: run a QAT view of the float model on a few
  batches (eagerly) and return its quantization statistics as a pure dict."""
  observer = qwix.quantize_model(
      nnx.clone(model), qwix.QtProvider(rules(spec, qwix.QtRule, static=True)),
      sample_input(model, input_shape))
  observer = nnx.view(observer, use_running_average=True,
                      raise_if_not_found=False)
  for images in batches:
    observer(jnp.asarray(images))
  return nnx.to_pure_dict(nnx.state(observer, qwix.QuantStat))


def int8_model(model: nnx.Module, spec: dict, input_shape,
               quant_stats: dict | None = None) -> nnx.Module:
  """The serving model: int8 (or int4) weights and scales from float weights."""
  shell = ptq_shell(nnx.clone(model), spec, input_shape)
  float_params = nnx.to_pure_dict(nnx.state(model))
  quantized = qwix.quantize_params(float_params, shell, quant_stats or {},
                                   allow_extra_params=True)
  state = nnx.state(shell)
  nnx.replace_by_pure_dict(state, quantized)
  nnx.update(shell, state)
  return shell


def ptq(model: nnx.Module, input_shape, scheme: str = "w8a8",
        module_path: str = ".*",
        calibration: Iterable[np.ndarray] | None = None
        ) -> tuple[nnx.Module, dict]:
  """(serving model, its quantization spec): post-training quantization of a
  float model in the layers `module_path` matches; with `calibration`
  batches, static activation scales from them, else dynamic ones. The one
  conversion the int8 stage and the optimizer's int8 variants share."""
  qspec = quantization_spec(scheme, module_path, calibration is not None,
                            mode="ptq")
  stats = (calibrate(model, qspec, input_shape, calibration)
           if calibration is not None else None)
  return int8_model(model, qspec, input_shape, stats), qspec
