"""Screening: every candidate architecture timed in interleaved runs with
the parent before anything is trained (latency does not depend on the
weights), with its FLOPs, the time XLA's cost model predicts and, for
pruned ones, the validation accuracy before fine-tuning. Architectures that
cannot meet the budget are never trained.
"""

from __future__ import annotations

import itertools

from rtjax.bench import breakdown
from rtjax.infer import lowering as lowering_lib
from rtjax.infer import options as options_lib
from rtjax.models import forward_flops
from rtjax.optimize import audit, candidates, estimated, serving
from rtjax.train.evaluate import evaluate

def cost_row(name, model, spec, compiled, lat, peaks, batch) -> dict:
  """A measured model's latency with what predicts it: FLOPs, XLA's
  t_compute + t_memory + t_comm, achieved GFLOP/s, how int8 layers were compiled."""
  terms = breakdown.breakdown(compiled.executables[batch], peaks)
  flops = forward_flops(model, spec["args"]["input_shape"])
  return {"name": name, "flops": flops, "args": spec["args"],
          "t_predicted_s": terms["t_predicted_s"],
          "bytes_accessed": terms["bytes_accessed"],
          "gflops_per_s": flops * batch / (lat["p50_ms"] * 1e-3) / 1e9,
          "int8_lowering": audit.int8_lowering(
              compiled.executables[batch].as_text()),
          **({"padding": compiled.padding}
             if isinstance(compiled, estimated.Estimated) else {}),
          **{k: lat[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p_ms")}}


def screen(parent, spec: dict, recipes: list[dict], batch: int,
           percentile: float, parent_options: dict, peaks: dict, val,
           seconds: float, runs: int = 3, run_seconds: float | None = None,
           compiler: serving.Compiler = serving.compile_with,
           kind: str | None = None) -> dict:
  """{name: cost row} for the parent and every recipe. First every
  candidate architecture in one interleaved run under each fixed serving
  variant (XLA's convs, every conv as patches or the parent's own
  per-layer lowering, weights passed or embedded, each kind of dot kernels
  this device has: which wins changes with the widths, and tuning one per
  candidate here would rank them partly by the noise of the tuning runs),
  the fastest at p50 kept; then
  the parent as it is served and each architecture in its fastest variant,
  `runs` interleaved runs of `run_seconds` (default `seconds`; medians),
  which give the latencies the search predicts from: their tail
  percentile needs hundreds of calls per model. The finalists get their
  tuned options; the settings' screen_slack leaves room for them.
  `compiler`: serving.compile_with or a search's memo; `kind`: the device
  the variants are for (default: the attached one's)."""
  base = {**parent_options, "round_widths_to": 0}
  built = {r["name"]: candidates.build(r, parent, spec) for r in recipes}
  variants, served = [], []
  for name, (model, s) in built.items():
    for conv_lowering, embed, dots in itertools.product(
        serving.conv_lowerings(model, s, parent_options["conv_lowering"]),
        serving.embed_choices(
            options_lib.device_kind(kind)), options_lib.dot_kernels(kind)):
      options = {**base, "conv_lowering": conv_lowering,
                 "embed_weights": embed, "dot_kernels": dots}
      variants.append((name, options))
      served.append(compiler(model, s, batch, options))
  fastest = {}
  for (name, options), compiled, lat in zip(
      variants, served, serving.interleaved(served, batch, percentile,
                                            seconds) if served else []):
    if name not in fastest or lat["p50_ms"] < fastest[name][2]:
      fastest[name] = (options, compiled, lat["p50_ms"])
  chosen = {"parent": (parent_options, compiler(
      parent, spec, batch, parent_options))}
  chosen.update({n: fastest[n][:2] for n in fastest})
  latency = serving.repeated([c for _, c in chosen.values()], batch,
                             percentile, run_seconds or seconds, runs)
  warm = {r["name"] for r in recipes if not candidates.from_scratch(r)}
  out = {}
  for (name, (options, compiled)), lat in zip(chosen.items(), latency):
    model, s = (parent, spec) if name == "parent" else built[name]
    row = cost_row(name, model, s, compiled, lat, peaks, batch)
    row["conv_lowering"] = lowering_lib.describe(compiled.conv_lowering[batch])
    row["embed_weights"] = options["embed_weights"]
    row["dot_kernels"] = options["dot_kernels"]
    if name == "parent" or name in warm:
      row["untuned_val_accuracy"] = evaluate(model, val, 512)["accuracy"]
    out[name] = row
  return out


def screened_p(screen_rows: dict, name: str,
               parent_p_ms: float | None = None) -> float:
  """A candidate architecture's percentile latency as screening predicts it:
  its percentile relative to the parent's in the same runs (medians of
  `runs`), times the parent's percentile latency (`parent_p_ms`, e.g. the
  one the budget was set from; default: the parent's here). The tail is
  the budget's measure: at batch 256 on the 2-core CPU small models' p99
  ran closer to their p50 than the parent's (one-off probe: a 24-channel
  cnn1d 1.5x its p50, its 64-channel parent 1.6-2.0x), so p50 ratios
  overestimated the small ones."""
  parent = screen_rows["parent"]
  reference = parent_p_ms or parent["p_ms"]
  return screen_rows[name]["p_ms"] / parent["p_ms"] * reference


def steady_p(screen_rows: dict, name: str,
             parent_p_ms: float | None = None) -> float:
  """The same prediction from the medians: a candidate's p50 relative to the
  parent's, times the parent's percentile latency. One burst of the
  machine's noise moves a tail ratio (in one MNIST-1D search uniform75's
  p99 ratio came out ahead of uniform50's, 1.61x against 1.44x, while at
  p50 they stood at 1.28x and 1.92x), so a candidate is screened in and
  fits when either figure says so, and those over the budget are ranked by
  this."""
  parent = screen_rows["parent"]
  reference = parent_p_ms or parent["p_ms"]
  return screen_rows[name]["p50_ms"] / parent["p50_ms"] * reference


def likely_p(screen_rows: dict, name: str,
             parent_p_ms: float | None = None) -> float:
  """What screening predicts when deciding whether a candidate is trained
  and fits: the lower of screened_p and steady_p (either may be the right
  one; the final runs measure again)."""
  return min(screened_p(screen_rows, name, parent_p_ms),
             steady_p(screen_rows, name, parent_p_ms))
