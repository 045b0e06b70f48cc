"""Rows of rtjax.target.predict as markdown: the target table, and what it
teaches per family (which are bound by padding or by the call on a TPU, and
what bf16 or int8 would buy there). Predicted columns say so in their
header; the one measured column (compile time on this host) says so too.
"""

from __future__ import annotations

from typing import Sequence

from rtjax.target.predict import PREDICTED

# A call is call-bound when at least this share of its estimated device time
# does not grow with its rows (reading the weights, fixed per-op work), and
# padding-bound when less than this share of the tiles its weights and
# activations occupy holds data.
CALL_BOUND_SHARE = 0.5
PADDING_BOUND_SHARE = 0.5

COLUMNS = (
    "family", "target", "executable", "batch", "mesh (data×model)",
    "compiled", "HBM per chip (pred.)", "GFLOP per chip (pred.)",
    "MB accessed per chip (pred.)", "XLA:TPU estimate µs (pred.)",
    "roofline µs: compute + memory + comm (pred.)",
    "weights in tiles (pred.)", "activations in tiles (pred.)",
    "most padded array (pred.)", "compile s (measured, this host)")


def _bytes(n) -> str:
  if n is None:
    return "–"
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= size:
      return f"{n / size:.3g} {unit}"
  return f"{n} B"


def _us(seconds) -> str:
  return "–" if seconds is None else f"{seconds * 1e6:.3g}"


def _share(value) -> str:
  return "–" if value is None else f"{value:.0%}"


def _cells(row: dict) -> list[str]:
  mesh = row["mesh"]
  head = [row.get("family", ""), row["target"],
          f"{row['what']} {row['dtype']}", str(row["batch"]),
          "×".join(str(mesh.get(a, 1)) for a in ("data", "model"))]
  if not row["compiled"]:
    return head + [f"no: {row['error']}"] + ["–"] * 8 + [
        f"{row['compile_s']:.1f}"]
  capacity = row["hbm_capacity"]
  fits = (f"{_bytes(row['hbm_bytes'])} of {_bytes(capacity)}"
          if capacity else _bytes(row["hbm_bytes"]))
  return head + [
      "yes", fits, f"{row['flops'] / 1e9:.3g}",
      f"{row['bytes_accessed'] / 2 ** 20:.3g}", _us(row["xla_estimate_s"]),
      f"{_us(row['roofline_s'])}: {_us(row['t_compute_s'])} + "
      f"{_us(row['t_memory_s'])} + {_us(row['t_comm_s'])}",
      _share(row["weights_data_share"]),
      _share(row["activations_data_share"]), row["most_padded"] or "–",
      f"{row['compile_s']:.1f}"]


def markdown_table(rows: Sequence[dict]) -> str:
  """Every row, one line each, under the PREDICTED label."""
  lines = [f"Columns marked (pred.) are {PREDICTED}: compiled for the slice "
           "on this host's CPU with libtpu; no TPU ran them.", "",
           "| " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |"
            for r in rows]
  return "\n".join(lines) + "\n"


def speedups(rows: Sequence[dict], reference: str,
             batch_sizes: Sequence[int]) -> str:
  """Per checkpoint (its rows' `family`), XLA:TPU's estimated speedup over
  `reference`'s serving executable at each batch: what a compression is
  predicted to buy on the slice."""
  estimate = {(r["family"], r["batch"]): _estimate(r)
              for r in rows if r["what"] == "serve"}
  lines = [f"Estimated speedup over {reference} ({PREDICTED}):", "",
           "| checkpoint | " + " | ".join(f"batch {b}" for b in batch_sizes)
           + " |", "|---|" + "---|" * len(batch_sizes)]
  for name in dict.fromkeys(r["family"] for r in rows):
    cells = []
    for b in batch_sizes:
      mine, ref = estimate.get((name, b)), estimate.get((reference, b))
      cells.append(f"{ref / mine:.2f}x" if mine and ref else "–")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _find(rows, **match):
  return next((r for r in rows if r["compiled"] and all(
      r.get(k) == v for k, v in match.items())), None)


def _estimate(row) -> float | None:
  return row["xla_estimate_s"] if row and row.get("xla_estimate_s") else None


def fixed_shares(small: int, t_small: float, large: int, t_large: float
                 ) -> tuple[float, float]:
  """The share of a call's time that does not grow with its rows, at
  `small` and at `large` rows, from the line through the two estimates
  (t = fixed + rows x per_row; a negative fixed part counts as none)."""
  per_row = (t_large - t_small) / (large - small)
  fixed = max(t_small - small * per_row, 0.0)
  return fixed / t_small, fixed / t_large


def _verdict(batch: int, fixed: float | None, share: float | None) -> str:
  bound = [what for what, on in (
      ("call-bound", fixed is not None and fixed >= CALL_BOUND_SHARE),
      ("padding-bound", share is not None and share < PADDING_BOUND_SHARE))
           if on]
  return f"batch {batch}: {', '.join(bound) or 'neither'}"


def _family_line(rows, family: str, target: str, small: int, large: int
                 ) -> str:
  at = lambda dtype, batch: _find(rows, family=family, target=target,
                                  what="serve", dtype=dtype, batch=batch)
  f32 = {b: at("float32", b) for b in (small, large)}
  times = {b: _estimate(row) for b, row in f32.items()}
  fixed = (fixed_shares(small, times[small], large, times[large])
           if None not in times.values() and small < large else (None, None))
  shares = {b: row and row["data_share"] for b, row in f32.items()}
  speedups = [times[large] / _estimate(at(d, large))
              if times[large] and _estimate(at(d, large)) else None
              for d in ("bfloat16", "int8")]
  return "| " + " | ".join([
      family, " → ".join(_us(times[b]) for b in (small, large)),
      " / ".join(_share(f) for f in fixed),
      " / ".join(_share(shares[b]) for b in (small, large)),
      "; ".join(_verdict(b, f, shares[b])
                for b, f in zip((small, large), fixed)),
      *("–" if s is None else f"{s:.2f}×" for s in speedups)]) + " |"


def lessons(rows: Sequence[dict], target: str, small: int, large: int
            ) -> str:
  """Per family, `target`'s float32 serving executables at `small` and
  `large` rows: their estimated times, the share of each that does not grow
  with the rows (call-bound from CALL_BOUND_SHARE), the share of the tiles
  their arrays occupy that holds data (padding-bound below
  PADDING_BOUND_SHARE), and bf16's and int8's estimated speedup at `large`."""
  lines = [f"On {target}, serving, from XLA:TPU's estimates ({PREDICTED}). "
           f"Fixed share: the part of a call's time that does not grow with "
           f"its rows (the line through the batch {small} and {large} "
           f"estimates); call-bound from {CALL_BOUND_SHARE:.0%}. "
           f"Padding-bound: under {PADDING_BOUND_SHARE:.0%} of the tiles "
           "the call's weights and activations occupy hold data.", "",
           f"| family | XLA:TPU µs, batch {small} → {large} (f32) | fixed "
           f"share, batch {small} / {large} | data in tiles, batch {small} / "
           f"{large} | verdict | bf16 speedup, batch {large} | int8 speedup, "
           f"batch {large} |", "|---|---|---|---|---|---|---|"]
  for family in dict.fromkeys(r.get("family", "") for r in rows):
    lines.append(_family_line(rows, family, target, small, large))
  return "\n".join(lines) + "\n"
