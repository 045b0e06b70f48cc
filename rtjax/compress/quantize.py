"""Quantization with qwix: QAT (QtProvider), and int8 serving models
(PtqProvider + quantize_params) that hold int8 values and scales.

A quantized checkpoint records {'scheme', 'module_path', 'static_activations',
'mode': 'qat'|'ptq'} under metadata['model']['quantization'], which is all
`rebuild` needs to wrap a fresh model the same way before restoring it.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

# Weight / activation types per scheme; weights are quantized per output
# channel, activations per tensor (dynamic, or static when calibrated).
SCHEMES = {
    "w8a8": {"weight_qtype": "int8", "act_qtype": "int8"},
    "w8": {"weight_qtype": "int8"},
    "w4": {"weight_qtype": "int4"},
}


def quantization_spec(scheme: str, module_path: str = ".*",
                      static_activations: bool = False,
                      mode: str = "qat") -> dict:
  if scheme not in SCHEMES:
    raise ValueError(f"unknown quantization scheme {scheme!r}; known: "
                     f"{', '.join(SCHEMES)} (w8a8: int8 weights and "
                     "activations, w8/w4: int8/int4 weight-only)")
  if static_activations and "act_qtype" not in SCHEMES[scheme]:
    raise ValueError(f"static activation scales need a scheme that quantizes "
                     f"activations (w8a8), not {scheme!r}")
  return {"scheme": scheme, "module_path": module_path,
          "static_activations": static_activations, "mode": mode}


def _rules(spec: dict, rule_class, static: bool):
  kwargs = dict(SCHEMES[spec["scheme"]])
  if static:
    kwargs["act_static_scale"] = True
  return [rule_class(module_path=spec["module_path"], **kwargs)]


def _sample(input_shape) -> jax.Array:
  return jnp.zeros((1, *input_shape), jnp.float32)


def qat_model(model: nnx.Module, spec: dict, input_shape) -> nnx.Module:
  """Fake-quantized training model (straight-through gradients), float weights."""
  return qwix.quantize_model(model, qwix.QtProvider(_rules(
      spec, qwix.QtRule, static=False)), _sample(input_shape))


def _ptq_shell(model: nnx.Module, spec: dict, input_shape) -> nnx.Module:
  return qwix.quantize_model(
      model, qwix.PtqProvider(_rules(spec, qwix.QuantizationRule,
                                     spec["static_activations"])),
      _sample(input_shape))


def calibrate(model: nnx.Module, spec: dict, input_shape,
              batches: Iterable[np.ndarray]) -> dict:
  """Static activation statistics: run a QAT view of the float model on a few
  batches (eagerly) and return its quantization statistics as a pure dict."""
  observer = qwix.quantize_model(
      nnx.clone(model), qwix.QtProvider(_rules(spec, qwix.QtRule, static=True)),
      _sample(input_shape))
  observer = nnx.view(observer, use_running_average=True,
                      raise_if_not_found=False)
  for images in batches:
    observer(jnp.asarray(images))
  return nnx.to_pure_dict(nnx.state(observer, qwix.QuantStat))


def int8_model(model: nnx.Module, spec: dict, input_shape,
               quant_stats: dict | None = None) -> nnx.Module:
  """The serving model: int8 (or int4) weights and scales from float weights."""
  shell = _ptq_shell(nnx.clone(model), spec, input_shape)
  float_params = nnx.to_pure_dict(nnx.state(model))
  quantized = qwix.quantize_params(float_params, shell, quant_stats or {},
                                   allow_extra_params=True)
  state = nnx.state(shell)
  nnx.replace_by_pure_dict(state, quantized)
  nnx.update(shell, state)
  return shell


def rebuild(model: nnx.Module, spec: dict, input_shape) -> nnx.Module:
  """Wraps a freshly built float model as a checkpoint's quantized model was."""
  if spec["mode"] == "qat":
    return qat_model(model, spec, input_shape)
  return _ptq_shell(model, spec, input_shape)
