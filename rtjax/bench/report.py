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


def peers_markdown(peers: dict[int, dict[str, dict]]) -> str:
  """Per batch and contender: p50/p99, throughput, rtjax's ratios to it."""
  if not peers:
    return ""
  lines = ["| batch | contender | p50 ms | p99 ms | items/s | rtjax p50 / "
           "its p50 | rtjax items/s / its items/s |", "|" + " --- |" * 7]
  for batch, contenders in peers.items():
    for name, r in contenders.items():
      lines.append(f"| {batch} | {name} | {r['p50_ms']:.4f} | "
                   f"{r['p99_ms']:.4f} | {r['throughput_per_s']:,.0f} | "
                   f"{r['rtjax_p50_ratio']:.2f} | "
                   f"{r['rtjax_throughput_ratio']:.2f} |")
  return "\n".join(lines) + "\n"


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
