"""Quantized models as checkpoints describe them: a float family member
wrapped by qwix, for QAT (QtProvider) or int8 serving (PtqProvider).

A quantized checkpoint records {'scheme', 'module_path', 'static_activations',
'mode': 'qat'|'ptq'} under metadata['model']['quantization'], which is all
`rebuild` needs to wrap a fresh model the same way before restoring it.
Converting weights (calibration, quantize_params) is rtjax.compress.quantize.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from rtjax.errors import ConfigError
from rtjax.models.registry import input_dtype

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
    raise ConfigError(f"unknown quantization scheme {scheme!r}; known: "
                     f"{', '.join(SCHEMES)} (w8a8: int8 weights and "
                     "activations, w8/w4: int8/int4 weight-only)")
  if static_activations and "act_qtype" not in SCHEMES[scheme]:
    raise ConfigError(f"static activation scales need a scheme that quantizes "
                     f"activations (w8a8), not {scheme!r}")
  return {"scheme": scheme, "module_path": module_path,
          "static_activations": static_activations, "mode": mode}


def rules(spec: dict, rule_class, static: bool):
  kwargs = dict(SCHEMES[spec["scheme"]])
  if static:
    kwargs["act_static_scale"] = True
  return [rule_class(module_path=spec["module_path"], **kwargs)]


def sample_input(model: nnx.Module, input_shape) -> jax.Array:
  """One example of zeros in the model's input dtype (a decoder's token
  ids are integers), for qwix to trace the model with."""
  return jnp.zeros((1, *input_shape), input_dtype(model))


def qat_model(model: nnx.Module, spec: dict, input_shape) -> nnx.Module:
  """Fake-quantized training model (straight-through gradients), float weights."""
  return qwix.quantize_model(model, qwix.QtProvider(rules(
      spec, qwix.QtRule, static=False)), sample_input(model, input_shape))


def ptq_shell(model: nnx.Module, spec: dict, input_shape) -> nnx.Module:
  return qwix.quantize_model(
      model, qwix.PtqProvider(rules(spec, qwix.QuantizationRule,
                                     spec["static_activations"])),
      sample_input(model, input_shape))


def rebuild(model: nnx.Module, spec: dict, input_shape) -> nnx.Module:
  """Wraps a freshly built float model as a checkpoint's quantized model was."""
  if spec["mode"] == "qat":
    return qat_model(model, spec, input_shape)
  return ptq_shell(model, spec, input_shape)
