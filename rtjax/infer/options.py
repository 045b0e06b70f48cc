"""Serving options and the one rule that picks each: an explicit choice
beats what the checkpoint's metadata recorded for this kind of device, which
beats this kind of device's default. So a conv lowering tuned on a CPU and
recorded for "cpu" is never applied on a TPU or GPU.

A checkpoint records options per kind of device as
metadata["serving"] = {"cpu": {"conv_lowering": "conv1:4x4", ...}, "tpu": {...}}.
"""

from __future__ import annotations

from typing import Mapping

import jax

# Every option CompiledModel takes, with its default per kind of device
# (jax's platform name). The banded conv lowering is a CPU remedy and f32
# keeps a model's trained numerics, so no kind starts from anything else.
# `dot_kernels` is what runs the matmuls on a CPU: "ynnpack", jax's CPU
# default (XLA hands dots to the YNNPACK library), or "xla", XLA's own dot
# kernels; on the MNIST-1D CNNs at batch 256 the latter measured faster.
# `kv_cache` is how a generation engine stores keys and values: "float"
# (the serving dtype) or "int8" (a scale per token and head).
DEFAULTS = {
    "cpu": {"dtype": "float32", "conv_lowering": "xla", "embed_weights": False,
            "round_widths_to": 0, "dot_kernels": "ynnpack",
            "kv_cache": "float"},
    "gpu": {"dtype": "float32", "conv_lowering": "xla", "embed_weights": False,
            "round_widths_to": 0, "dot_kernels": "xla", "kv_cache": "float"},
    "tpu": {"dtype": "float32", "conv_lowering": "xla", "embed_weights": False,
            "round_widths_to": 0, "dot_kernels": "xla", "kv_cache": "float"},
}
KV_CACHES = ("float", "int8")
OPTIONS = tuple(DEFAULTS["cpu"])
DOT_KERNELS = {"cpu": ("ynnpack", "xla"), "gpu": ("xla",), "tpu": ("xla",)}


def device_kind(platform: str | None = None) -> str:
  """'cpu', 'gpu' or 'tpu': the kind options are recorded and defaulted for
  (jax's default backend unless given; rocm and cuda count as gpu)."""
  platform = platform or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve(explicit: Mapping[str, object] | None = None,
            metadata: Mapping | None = None,
            kind: str | None = None) -> dict[str, object]:
  """Every option: `explicit` (values that are not None) over
  metadata["serving"][kind] over DEFAULTS[kind]; also where each came from,
  under "source" ({option: 'flag' | 'checkpoint' | 'default'})."""
  kind = device_kind(kind)
  explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
  unknown = sorted(set(explicit) - set(OPTIONS))
  if unknown:
    raise ValueError(f"unknown serving option(s) {', '.join(unknown)}; "
                     f"known: {', '.join(OPTIONS)}")
  recorded = dict(((metadata or {}).get("serving") or {}).get(kind) or {})
  defaults = DEFAULTS.get(kind, DEFAULTS["cpu"])
  chosen, source = {}, {}
  for option in OPTIONS:
    for origin, values in (("flag", explicit), ("checkpoint", recorded),
                           ("default", defaults)):
      if option in values:
        chosen[option], source[option] = values[option], origin
        break
  return chosen | {"source": source}


def dot_kernels(kind: str | None = None) -> tuple[str, ...]:
  """The dot kernels this kind of device can run (jax's default first)."""
  return DOT_KERNELS.get(device_kind(kind), ("xla",))


def compiler_options(dot_kernel: str, kind: str | None = None
                     ) -> dict[str, str]:
  """XLA compiler options (jax's `.compile(compiler_options=...)`, one
  executable's, unlike XLA_FLAGS) that give `dot_kernel` on `kind`; a
  ValueError names the choices when that kind has no such kernels."""
  kind = device_kind(kind)
  known = dot_kernels(kind)
  if dot_kernel not in known:
    raise ValueError(f"dot_kernels {dot_kernel!r} on {kind}: use one of "
                     f"{', '.join(known)}")
  if kind == "cpu" and dot_kernel == "xla":
    return {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions
  return {}
