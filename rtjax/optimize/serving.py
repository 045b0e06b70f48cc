"""Serving a model at its best on this device, and timing models side by side.

Every model in a search (the parent included, so that the budget is won by
changing the model and not by serving the parent badly) is served with the
options that measured fastest for it at the search's batch size: weights
embedded or passed, float32 or bfloat16, widths padded to a multiple of 8,
XLA's convolutions or banded matmuls ("auto", pinned to what it chose), and
on a CPU the YNNPACK library's dot kernels or XLA's own.
Options that change the predictions (bf16) must agree with float32 on 99%
of the validation inputs to be considered.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
from flax import nnx

from rtjax import accelerators
from rtjax.bench.latency import interleaved_latency
from rtjax.infer import CompiledModel
from rtjax.infer import lowering as lowering_lib
from rtjax.infer import options as options_lib
from rtjax.infer.precision import is_float_model
from rtjax.models import model_class
from rtjax.optimize import estimated

# How a model is served at its best, for whoever asks (a search, or its
# parent's measurement); not search settings.
MIN_AGREEMENT = 0.99  # of a reduced-precision option's argmax with float32
# An option replaces a simpler one when it is 3% faster at the percentile
# and no slower at the median (a tail percentile alone is noisy here).
SIMPLER_WINS_WITHIN = 0.03


def compile_with(model: nnx.Module, spec: dict, batch: int,
                 options: dict) -> CompiledModel:
  """The model compiled for one batch size with exactly these options (none
  taken from a checkpoint)."""
  return CompiledModel(model, spec["args"]["input_shape"], batch_sizes=[batch],
                       spec=spec, metadata=None, **options)


# How a model is compiled for (model, spec, batch, options): compile_with,
# or a search's memo of compiled models (rtjax.optimize.memo).
Compiler = Callable[[nnx.Module, dict, int, dict], CompiledModel]


def interleaved(served: Sequence[CompiledModel], batch: int, percentile: float,
                seconds: float = 4.0) -> list[dict]:
  """Latency of each model at `batch`, in turns for about `seconds`, with
  `p_ms` the `percentile`-th (rtjax.bench.latency.interleaved_latency); for
  models compiled for a slice that is not attached, XLA:TPU's estimate
  (rtjax.optimize.estimated), and nothing runs."""
  if served and isinstance(served[0], estimated.Estimated):
    return estimated.rows(served)
  return interleaved_latency(served, batch, iters=100, warmup=10,
                             seconds=seconds, percentile=percentile)


def repeated(served: Sequence[CompiledModel], batch: int, percentile: float,
             seconds: float, runs: int) -> list[dict]:
  """interleaved() `runs` times; each figure the median over the runs (one
  run's tail percentile is at the mercy of one burst of the machine's
  noise, and the budget is a fraction of the parent's), with every run's
  `p_ms` in `p_ms_runs`."""
  results = [interleaved(served, batch, percentile, seconds)
             for _ in range(runs)]
  out = []
  for rows in zip(*results):
    out.append({k: float(np.median([r[k] for r in rows])) for k in rows[0]}
               | {"p_ms_runs": [r["p_ms"] for r in rows]})
  return out


def embed_choices(kind: str) -> tuple[bool, ...]:
  """Weights passed, or also embedded as constants (a host-side remedy for
  small models' per-call cost; a TPU slice's weights stay in HBM)."""
  return (False,) if kind == "tpu" else (False, True)


def width_multiples(kind: str) -> tuple[int, ...]:
  """Padded widths worth trying: a CPU's vector width (8 floats); a TPU's
  sublanes and lanes (its float32 tiles)."""
  return accelerators.TILES["float32"] if kind == "tpu" else (8,)


def conv_lowerings(model: nnx.Module, spec: dict, own: str) -> list[str]:
  """XLA's convs, every conv as patches, and `own`, a per-layer choice such
  as another model's ('conv1:patches'), kept for the layers this model can
  lower that way (pruning keeps the layer names). A mixed choice can beat
  both uniform ones: in one MNIST-1D search uniform50 screened at 0.58x the
  parent's p50 as all patches, and ran at 0.49x under its parent's
  conv1-only patches."""
  shape = spec["args"]["input_shape"]
  blocks = lowering_lib.candidate_blocks(model, shape)
  chosen = lowering_lib.parse_lowering(own)
  kept = {path: block for path, block in (
      chosen.items() if isinstance(chosen, dict) else ())
          if block in blocks.get(path, ())}
  return list(dict.fromkeys((
      "xla", lowering_lib.describe(lowering_lib.all_patches(model, shape)),
      lowering_lib.describe(kept))))


def option_grid(model: nnx.Module, spec: dict, fixed: dict | None = None,
                kind: str | None = None) -> list[dict]:
  """The option sets worth timing for this model on this kind of device
  (default: the attached one's), simplest first (the device's defaults),
  those with the `fixed` options' values only. Convs run as XLA's, all as
  patches or as `fixed` lowers them, timed side by side with the other
  options; choose_options may then refine the winner per layer ('auto')."""
  kind = options_lib.device_kind(kind)
  floating = is_float_model(model) and not spec.get("quantization")
  cls = model_class(spec["name"])
  widths = [0]
  if floating and hasattr(cls, "prunable_groups"):
    groups = cls.prunable_groups(spec["args"])
    widths += [m for m in width_multiples(kind)
               if any(g.width % m for g in groups)]
  lowerings = conv_lowerings(model, spec, (fixed or {}).get(
      "conv_lowering", "xla")) if floating else ["xla"]
  grid = []
  for lowering, embed, dtype, width, dots in itertools.product(
      lowerings, embed_choices(kind),
      ("float32", "bfloat16") if floating else ("float32",),
      widths, options_lib.dot_kernels(kind)):
    grid.append({"conv_lowering": lowering, "embed_weights": embed,
                 "dtype": dtype, "round_widths_to": width,
                 "dot_kernels": dots})
  grid = [o for o in grid
          if all(o[k] == v for k, v in (fixed or {}).items())]
  defaults = options_lib.DEFAULTS.get(kind, options_lib.DEFAULTS["cpu"])
  grid.sort(key=lambda o: sum(o[k] != defaults[k] for k in o))
  return grid


def _faster(a: dict, b: dict) -> bool:
  return (a["p_ms"] < b["p_ms"] * (1 - SIMPLER_WINS_WITHIN)
          and a["p50_ms"] <= b["p50_ms"])


def _agrees(served: CompiledModel, reference: np.ndarray,
            images: np.ndarray) -> bool:
  return float(np.mean(np.argmax(served(images), -1) == reference)
               ) >= MIN_AGREEMENT


def choose_options(model: nnx.Module, spec: dict, batch: int,
                   percentile: float, val_images: np.ndarray,
                   seconds: float = 3.0, try_auto: bool = True,
                   compiler: Compiler = compile_with,
                   fixed: dict | None = None, kind: str | None = None) -> dict:
  """{'options', 'trials'}: the fastest admissible option set at `batch` by
  the `percentile`-th latency of one interleaved run, then whether banded
  conv matmuls ('auto', timed per layer) beat XLA's convs under it; the
  conv lowering is recorded as the per-layer choice, not as 'auto'.
  `fixed`: options already measured for this architecture (a search's
  screening), kept as they are. `kind`: the device the options are for
  (default: the attached one's)."""
  grid = option_grid(model, spec, fixed, kind)
  served = [compiler(model, spec, batch, o) for o in grid]
  reference = np.argmax(served[0](val_images), -1)
  admissible = [i for i, s in enumerate(served)
                if grid[i]["dtype"] == "float32"
                or _agrees(s, reference, val_images)]
  results = interleaved([served[i] for i in admissible], batch, percentile,
                        seconds)
  trials = [{"options": grid[i], "p_ms": r["p_ms"], "p50_ms": r["p50_ms"]}
            for i, r in zip(admissible, results)]
  best = trials[0]
  for trial in trials[1:]:
    if _faster(trial, best):
      best = trial
  options = dict(best["options"])
  if try_auto and is_float_model(model) and lowering_lib.candidate_blocks(
      model, spec["args"]["input_shape"]):
    tuned = compiler(model, spec, batch, {**options, "conv_lowering": "auto"})
    chosen = tuned.conv_lowering[batch]
    if chosen:
      plain = served[grid.index(best["options"])]
      r_plain, r_tuned = interleaved([plain, tuned], batch, percentile, seconds)
      trials.append({"options": {**options, "conv_lowering":
                                 lowering_lib.describe(chosen)},
                     "p_ms": r_tuned["p_ms"], "p50_ms": r_tuned["p50_ms"],
                     "against_p_ms": r_plain["p_ms"]})
      if _faster(r_tuned, r_plain):
        options["conv_lowering"] = lowering_lib.describe(chosen)
  return {"options": options, "trials": trials}
