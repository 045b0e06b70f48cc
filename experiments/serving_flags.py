"""Flags every serving entry point shares (bench, predict, compare)."""

import jax
from absl import app, flags

from experiments import logs
from rtjax.infer.lowering import parse_lowering

_CONV_LOWERING = flags.DEFINE_string(
    "conv_lowering", "xla", "xla: XLA's convolutions; auto: time XLA's conv "
    "and banded matmuls per conv layer and batch size, keep the fastest; or "
    "pin a choice of output block rows x cols, e.g. conv1:4x4,conv2:1x5.")
_EMBED = flags.DEFINE_bool(
    "embed_weights", False, "Compile the weights into the executables as "
    "constants (small models; no model mesh axis).")
_ASYNC_DISPATCH = flags.DEFINE_bool(
    "cpu_async_dispatch", False, "Keep jax's asynchronous CPU dispatch. Off by "
    "default here: handing each call to a worker thread costs more than a "
    "small batch-1 call takes.")


def setup() -> dict:
  """Call first in main(), before any JAX computation creates the CPU client
  (the dispatch mode is fixed then); also quiets orbax's INFO logs. Returns
  CompiledModel's serving options."""
  logs.quiet_orbax()
  jax.config.update("jax_cpu_enable_async_dispatch", _ASYNC_DISPATCH.value)
  try:
    lowering = parse_lowering(_CONV_LOWERING.value)
  except ValueError as e:
    raise app.UsageError(f"--conv_lowering: {e}") from e
  return {"conv_lowering": lowering, "embed_weights": _EMBED.value}
