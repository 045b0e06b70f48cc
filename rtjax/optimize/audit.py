"""Is it really faster? For every candidate: the speedup its FLOPs predict,
the speedup XLA's cost model predicts through t_compute + t_memory + t_comm
(rtjax.bench.breakdown), and the speedup measured in the same interleaved
run as the parent. A candidate whose compression did not pay on this
device is named as such, with the reasons found in the measurements:
int8 layers compiled as int32 or float, a fixed per-call cost that dominates,
memory traffic that did not shrink, or kernels slower on narrow layers.
"""

from __future__ import annotations

import re

# How the audit reads measurements, not choices of a search (they decide
# nothing, so reports of different searches read alike): fixed here.
PAYS = 1.05  # a measured p50 speedup below this did not pay
DISPATCH_BOUND = 0.5  # the per-call floor's share that makes a call overhead-bound
FEWER_FLOPS = 1.25  # 20% fewer FLOPs: a change padding should not eat

_OP = re.compile(r"=\s*(\w+)\[[^=]*\b(convolution|dot)\((.*?)\)")


def int8_lowering(hlo_text: str) -> str | None:
  """How a compiled program runs its int8 layers: 'int32' when XLA widened
  the int8 operands (convert s8 -> s32) and runs an int32 convolution or
  dot (what XLA's CPU backend does: it has no int8 kernel), 'float' when
  every convolution/dot is float although the program holds int8 arrays;
  None when it holds no int8 arrays or runs them as int8."""
  if "s8[" not in hlo_text:
    return None
  ops = [m for m in map(_OP.search, hlo_text.splitlines()) if m]
  if any(m.group(1) == "s32" and "convert" in m.group(3) for m in ops):
    return "int32"
  if ops and all(m.group(1) in ("f32", "bf16", "f16") for m in ops):
    return "float"
  return None


def audit(row: dict, parent: dict, floor_ms: float) -> dict:
  """Predicted and measured speedups of `row` over `parent` (rows with
  flops, t_predicted_s, p50_ms, p_ms, gflops_per_s and int8_lowering) and, when it did not pay, why."""
  flops = parent["flops"] / row["flops"] if row["flops"] else float("nan")
  roofline = parent["t_predicted_s"] / row["t_predicted_s"]
  measured = parent["p50_ms"] / row["p50_ms"]
  out = {"predicted_flops": flops, "predicted_roofline": roofline,
         "measured_p50": measured, "measured_p": parent["p_ms"] / row["p_ms"],
         "paid": measured >= PAYS, "reasons": []}
  if out["paid"]:
    return out
  reasons = out["reasons"]
  if row.get("int8_lowering"):
    reasons.append(f"its int8 layers are not run as int8: XLA compiled them "
                   f"as {row['int8_lowering']} convolutions/dots after "
                   "converting the int8 arrays (no int8 kernel on this "
                   "backend), so int8 adds conversions instead of removing "
                   "work")
  if flops < 1.0:
    reasons.append(f"it does {1 / flops:.2f}x the parent's FLOPs")
  share = floor_ms / row["p50_ms"]
  if share >= DISPATCH_BOUND:
    reasons.append(f"dispatch overhead dominates: a trivial jitted call "
                   f"takes {floor_ms:.4f} ms, {100 * share:.0f}% of this "
                   "call, and no model change removes it")
  padding, parent_padding = row.get("padding"), parent.get("padding")
  if padding and flops >= FEWER_FLOPS:
    reasons.append(
        f"padding ate its {flops:.2f}x fewer FLOPs on the slice's tiles: "
        f"{padding['data_share']:.0%} of the tiles its arrays occupy hold "
        f"data (the parent's {parent_padding['data_share']:.0%}); most "
        f"padded: {padding['most_padded']}")
  if flops >= 1.2 and roofline < PAYS:
    reasons.append(f"memory-bound: XLA's cost model predicts only "
                   f"{roofline:.2f}x (bytes accessed barely fall) for "
                   f"{flops:.2f}x fewer FLOPs")
  rate, parent_rate = row.get("gflops_per_s"), parent.get("gflops_per_s")
  if rate and parent_rate and rate < 0.7 * parent_rate and flops >= 1.2:
    reasons.append(f"XLA's kernels run its smaller layers at {rate:.2f} "
                   f"GFLOP/s against {parent_rate:.2f} for the parent")
  if not reasons:
    reasons.append("no cause found in FLOPs, memory traffic, int8 or "
                   "dispatch; the difference is within this machine's noise")
  return out
