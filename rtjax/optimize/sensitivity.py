"""Where the parent is fragile: for every prunable group (what the family's
structured pruning knows: conv filters, dense units, heads, recurrent units)
the validation accuracy lost at a few keep fractions without fine-tuning,
and for int8 each Conv/Linear layer alone; beside each, the latency change
at the search's batch size measured in one interleaved run with the parent.

The search builds non-uniform candidates from it (prune the groups that
cost little accuracy and buy latency), and int8 only where it measured
faster on this device. For a family with droppable blocks (residual blocks,
stacked layers: rtjax.models.depth) it also measures the accuracy lost by
removing each block alone (layer dropping), from which the search picks
the blocks its shallower students leave out.
"""

from __future__ import annotations

import re
from typing import Sequence

from etils import epath
from flax import nnx

from rtjax import models
from rtjax.compress import quantize, structured
from rtjax.models import model_class
from rtjax.models.stats import layer_shapes
from rtjax.optimize import serving
from rtjax.train.evaluate import evaluate

FRACTIONS = (0.75, 0.5, 0.25)


def shrink_groups(model: nnx.Module, spec: dict, keep: dict[str, float],
                  criterion: str = "l2", round_to: int = 1
                  ) -> tuple[nnx.Module, dict]:
  """The parent with each named group kept at its own fraction (groups not
  named keep all units; kept counts rounded up to multiples of `round_to`):
  one structured.shrink per distinct fraction over the groups that share
  it, so coupled axes stay consistent; (smaller model, its args)."""
  args = spec["args"]
  for fraction in sorted({f for f in keep.values() if f < 1.0}, reverse=True):
    names = sorted(g for g, f in keep.items() if f == fraction)
    pattern = "^(" + "|".join(map(re.escape, names)) + ")$"
    model, args, _ = structured.shrink(model, spec["name"], args, fraction,
                                       criterion, round_to, pattern)
  return model, args


def group_names(spec: dict) -> list[str]:
  cls = model_class(spec["name"])
  if not hasattr(cls, "prunable_groups"):
    return []
  return [g.name for g in cls.prunable_groups(spec["args"])]


def int8_layer(model: nnx.Module, spec: dict, path: str) -> nnx.Module:
  """The parent served with int8 weights and activations (qwix PTQ) in one
  layer only."""
  return quantize.ptq(model, spec["args"]["input_shape"],
                      module_path=re.escape(path))[0]


def block_drops(model: nnx.Module, spec: dict, val,
                parent_acc: float) -> list[dict]:
  """[{'name', 'index', 'accuracy_drop'}]: each droppable block removed
  alone, validation accuracy lost (points, against the parent's
  `parent_acc`) without fine-tuning; none when the model is one block
  deep."""
  name, args = spec["name"], spec["args"]
  if models.block_count(name, args) < 2:
    return []
  out = []
  for i in models.droppable_blocks(name, args):
    smaller, _ = models.drop_blocks(model, name, args, [i])
    out.append({"name": f"block {i}", "index": i, "accuracy_drop": 100 * (
        parent_acc - evaluate(smaller, val, 512)["accuracy"])})
  return out


def measure(model: nnx.Module, spec: dict, val, batch: int, percentile: float,
            options: dict, fractions: Sequence[float] = FRACTIONS,
            int8: bool = True, seconds: float = 6.0, groups: str = ".*",
            compiler: serving.Compiler = serving.compile_with,
            layer_drop: bool = True) -> dict:
  """{'groups': [...], 'int8': [...], 'blocks': [...], 'parent': {...}}:
  one entry per (group, fraction) and per int8 layer with its validation
  accuracy drop (points) and its measured speedup (parent p50 / its p50;
  and at the percentile) at `batch`, for the groups matching the regex
  `groups`; per droppable block its accuracy drop (block_drops).
  `options` (the parent's) serve every variant, except a conv lowering
  tuned for the parent's shapes."""
  options = {**options, "conv_lowering": "xla", "round_widths_to": 0}
  parent_acc = evaluate(model, val, 512)["accuracy"]
  variants = []  # (kind, name, fraction, model)
  for group in group_names(spec):
    if not re.search(groups, group):
      continue
    for fraction in fractions:
      smaller, _ = shrink_groups(model, spec, {group: fraction})
      variants.append(("group", group, fraction, smaller))
  if int8:
    for path in layer_shapes(model, spec["args"]["input_shape"]):
      variants.append(("int8", path, None, int8_layer(model, spec, path)))
  served = [compiler(model, spec, batch, options)]
  for kind, _, _, m in variants:
    served.append(compiler(
        m, spec, batch, options if kind == "group" else
        {**options, "dtype": "float32", "round_widths_to": 0}))
  latency = serving.interleaved(served, batch, percentile, seconds)
  base = latency[0]
  out = {"parent": {"val_accuracy": parent_acc, **base}, "groups": [],
         "int8": [], "blocks": block_drops(model, spec, val, parent_acc)
         if layer_drop else []}
  for (kind, name, fraction, m), lat in zip(variants, latency[1:]):
    entry = {"name": name,
             "accuracy_drop": 100 * (parent_acc - evaluate(m, val, 512)[
                 "accuracy"]),
             "speedup_p50": base["p50_ms"] / lat["p50_ms"],
             "speedup_p": base["p_ms"] / lat["p_ms"],
             "p50_ms": lat["p50_ms"], "p_ms": lat["p_ms"]}
    if kind == "group":
      out["groups"].append({**entry, "keep": fraction})
    else:
      out["int8"].append(entry)
  return out


def markdown(sens: dict, figure: str, one_figure: bool = False) -> str:
  """The table; `figure` names the latency (p99; 'est.' for a slice's one
  estimate, shown alone with `one_figure`)."""
  speedups = (f"speedup ({figure}) |" if one_figure
              else f"speedup p50 | speedup {figure} |")
  lines = ["| kind | group / layer | keep | val acc. drop (points) | "
           + speedups, "|" + " --- |" * (5 if one_figure else 6)]

  def cells(e):
    return (f"{e['speedup_p']:.2f}x |" if one_figure else
            f"{e['speedup_p50']:.2f}x | {e['speedup_p']:.2f}x |")
  for e in sens["groups"]:
    lines.append(f"| prune | {e['name']} | {e['keep']:.2f} | "
                 f"{e['accuracy_drop']:+.2f} | {cells(e)}")
  for e in sens["int8"]:
    lines.append(f"| int8 | {e['name']} | | {e['accuracy_drop']:+.2f} | "
                 f"{cells(e)}")
  for e in sens.get("blocks", []):
    lines.append(f"| drop | {e['name']} | | {e['accuracy_drop']:+.2f} | "
                 + ("|" if one_figure else "| |"))
  return "\n".join(lines) + "\n"


def plot(sens: dict, path) -> None:
  """Panels side by side, each readable however many entries it has: one
  line per prunable group (accuracy drop vs keep fraction); int8 per layer
  and layer dropping per block as horizontal bars, one labelled row each."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  bars = [(title, entries) for title, entries in (
      ("int8 in one layer alone", sens["int8"]),
      ("one block removed (layer dropping)", sens.get("blocks", [])))
          if entries]
  rows = max([len(e) for _, e in bars] + [8])
  fig, axes = plt.subplots(1, 1 + len(bars), squeeze=False, figsize=(
      6 + 4.5 * len(bars), max(4.5, 0.28 * rows + 1.5)))
  ax = axes[0][0]
  for name in dict.fromkeys(e["name"] for e in sens["groups"]):
    points = sorted([(1.0, 0.0)] + [(e["keep"], e["accuracy_drop"])
                                    for e in sens["groups"]
                                    if e["name"] == name])
    ax.plot(*zip(*points), marker="o", label=name)
  ax.set_xlabel("keep fraction")
  ax.set_ylabel("validation accuracy drop, no fine-tuning (points)")
  ax.set_title("pruning one group")
  if sens["groups"]:
    ax.legend(fontsize=7, loc="upper right")
  for ax, (title, entries) in zip(axes[0][1:], bars):
    ax.barh(range(len(entries)), [e["accuracy_drop"] for e in entries])
    ax.set_yticks(range(len(entries)), [e["name"] for e in entries],
                  fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel("validation accuracy drop (points)")
    ax.set_title(title)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
