"""experiments.bench's tables as markdown, for experiments/results/."""

from __future__ import annotations


def latency_markdown(rows: list[dict]) -> str:
  """One row per (checkpoint, batch): percentiles, throughput, speedup."""
  lines = ["| checkpoint | batch | p50 ms | p90 ms | p99 ms | items/s | "
           "speedup (p50) | compile s |", "|" + " --- |" * 8]
  for r in rows:
    lines.append(f"| {r['checkpoint']} | {r['batch']} | {r['p50_ms']:.3f} | "
                 f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | "
                 f"{r['throughput_per_s']:,.0f} | {r['speedup_p50']:.2f}x | "
                 f"{r['compile_seconds']:.3f} |")
  return "\n".join(lines) + "\n"


def serving_summary(model) -> str:
  """How a CompiledModel serves: dtype, conv lowering per batch, weights,
  dot kernels."""
  from rtjax.infer.lowering import describe  # jax: only when serving
  lowering = "; ".join(f"{b}: {describe(l)}"
                       for b, l in model.conv_lowering.items())
  return (f"{model.options['dtype']}, conv lowering {lowering}, weights "
          f"{'embedded' if model.options['embed_weights'] else 'passed'}, "
          f"{model.options['dot_kernels']} dots")


def peers_markdown(peers: dict[str, dict]) -> str:
  """Per checkpoint, batch and contender: p50/p99, throughput and rtjax's
  ratios to it (below 1: rtjax faster in latency; above 1: in throughput);
  then each peer's setting and the peers that could not run."""
  if not peers:
    return ""
  lines = ["| model | batch | contender | p50 ms | p99 ms | items/s | rtjax "
           "p50 / its p50 | rtjax p99 / its p99 | rtjax items/s / its "
           "items/s |", "|" + " --- |" * 9]
  notes = []
  for path, per_batch in peers.items():
    notes.append(f"- {per_batch['model']} (`{path}`): rtjax serves "
                 f"{per_batch['serving']}")
    for batch, result in per_batch.items():
      if not isinstance(batch, int):
        continue
      for name, r in result["contenders"].items():
        lines.append(f"| {per_batch['model']} | {batch} | {name} | "
                     f"{r['p50_ms']:.4f} | {r['p99_ms']:.4f} | "
                     f"{r['throughput_per_s']:,.0f} | "
                     f"{r['rtjax_p50_ratio']:.2f} | {r['rtjax_p99_ratio']:.2f}"
                     f" | {r['rtjax_throughput_ratio']:.2f} |")
      notes += [f"  - batch {batch}, {name}: {d['setting']} (fastest tried)"
                for name, d in result["details"].items() if "setting" in d]
      notes += [f"  - batch {batch}: {note}" for note in result["notes"]]
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def streaming_markdown(streaming: dict[int, dict]) -> str:
  """Per chunk size: per-step p50/p99, the device's share, host overhead."""
  if not streaming:
    return ""
  lines = ["| steps per call | step p50 ms | step p99 ms | device step p50 ms "
           "| host overhead per step us |", "|" + " --- |" * 5]
  for chunk, r in streaming.items():
    lines.append(f"| {chunk} | {r['step_p50_ms']:.4f} | {r['step_p99_ms']:.4f}"
                 f" | {r['device_step_p50_ms']:.4f} | "
                 f"{r['host_overhead_per_step_us']:.1f} |")
  return "\n".join(lines) + "\n"
