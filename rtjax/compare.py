"""Checkpoints side by side: accuracy, agreement with a reference, size,
FLOPs and latency, with the Pareto front of accuracy vs p99 latency.

Every checkpoint is rebuilt from its own metadata and evaluated on the same
split; latency is measured for all of them in one run, calls interleaved.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx

from rtjax.bench import provenance
from rtjax.bench.latency import interleaved_latency
from rtjax.checkpoint import CheckpointError, load_checkpoint, model_bytes
from rtjax.data import Split
from rtjax.errors import UserError
from rtjax.infer import CompiledModel
from rtjax.train.evaluate import predict_logits


class CompareError(UserError):
  """Checkpoints cannot be compared; the message names the culprit."""


def stage_checkpoints(workdir: epath.PathLike) -> list[epath.Path]:
  """A run's checkpoints: its stages in config order, or the run itself."""
  workdir = epath.Path(workdir)
  if (workdir / "checkpoints").exists():
    return [workdir]
  stages = [p for p in workdir.iterdir() if (p / "checkpoints").is_dir()]
  if not stages:
    raise CompareError(f"{workdir} holds no checkpoints (no checkpoints/ and "
                       "no stage directories with one)")
  _, metadata = load_checkpoint(stages[0])
  order = list(metadata["config"].get("stages") or [])
  rank = {name: i for i, name in enumerate(order)}
  return sorted(stages, key=lambda p: (rank.get(p.name, len(order)), p.name))


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
  """Mean KL(reference || other) of the softmax distributions."""
  log_p = jax.nn.log_softmax(reference_logits.astype(np.float64), axis=-1)
  log_q = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
  return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
  return float(np.mean(np.argmax(reference_logits, -1) == np.argmax(logits, -1)))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of (accuracy, latency) points no other point dominates (at least
  as accurate and as fast, better in one), fastest first."""
  front = []
  for i, (acc, lat) in enumerate(points):
    dominated = any(a >= acc and l <= lat and (a > acc or l < lat)
                    for j, (a, l) in enumerate(points) if j != i)
    if not dominated:
      front.append(i)
  return sorted(front, key=lambda i: points[i][1])


def best_under_budget(rows: list[dict], budget_ms: float, key: str) -> dict | None:
  fits = [r for r in rows if r[key] <= budget_ms]
  return max(fits, key=lambda r: (r["accuracy"], -r[key])) if fits else None


@dataclasses.dataclass
class Loaded:
  name: str
  path: epath.Path
  model: nnx.Module
  metadata: dict


def load_all(paths: Sequence[epath.PathLike]) -> list[Loaded]:
  loaded = []
  for path in paths:
    path = epath.Path(path)
    try:
      model, metadata = load_checkpoint(path)
    except CheckpointError as e:
      raise CompareError(f"cannot compare {path}: {e}") from e
    name = metadata.get("stage") or path.name
    if name == "train" or any(l.name == name for l in loaded):
      name = path.name
    loaded.append(Loaded(name, path, model, metadata))
  names = [l.name for l in loaded]
  for l in loaded:  # still ambiguous (runs/mlp/seed0, runs/cnn/seed0)
    if names.count(l.name) > 1:
      l.name = f"{l.path.parent.name}/{l.path.name}"
  first = loaded[0].metadata["dataset"]
  for item in loaded[1:]:
    ds = item.metadata["dataset"]
    if (ds["input_shape"], ds["num_classes"]) != (first["input_shape"],
                                                  first["num_classes"]):
      raise CompareError(
          f"{item.path} takes {ds['input_shape']} inputs with "
          f"{ds['num_classes']} classes but {loaded[0].path} takes "
          f"{first['input_shape']} with {first['num_classes']}: they cannot "
          "share a dataset")
  return loaded


# The batch buckets a run's report times (a launch's pre-flight compiles them).
REPORT_BATCH_SIZES = (1, 256)


def compare(loaded: list[Loaded], split: Split, reference: str | None = None,
            batch_sizes: Sequence[int] = REPORT_BATCH_SIZES,
            iters: int = 200, warmup: int = 20, **serving) -> list[dict]:
  """One row per checkpoint; latency keys `p50_ms_b{N}` / `p99_ms_b{N}`;
  `serving`: CompiledModel options (conv_lowering, embed_weights, dtype);
  each row also has the served program's accuracy and its change."""
  names = [l.name for l in loaded]
  ref_index = 0
  if reference is not None:
    matches = [i for i, l in enumerate(loaded)
               if reference in (l.name, str(l.path))]
    if not matches:
      raise CompareError(f"unknown reference {reference!r}; the checkpoints "
                         f"are {', '.join(names)}")
    ref_index = matches[0]
  logits = [predict_logits(l.model, split.images) for l in loaded]
  rows = []
  for l, out in zip(loaded, logits):
    params = jax.tree.leaves(nnx.state(l.model, nnx.Param))
    rows.append({
        "name": l.name, "path": str(l.path),
        "stage_type": l.metadata.get("stage_type", "train"),
        "model": l.metadata["model"]["name"],
        "params": int(sum(np.size(p) for p in params)),
        "nonzero_params": int(sum(np.count_nonzero(np.asarray(p)) for p in params)),
        "flops": float(l.metadata["flops_per_example"]),
        "bytes": model_bytes(l.path),
        "dtypes": sorted({str(np.asarray(p).dtype) for p in params}),
        "accuracy": float(np.mean(np.argmax(out, -1) == split.labels)),
        "agreement": agreement(logits[ref_index], out),
        "kl": mean_kl(logits[ref_index], out),
        **_lineage(l.metadata),
    })
  served = [CompiledModel(l.model, l.metadata["model"]["args"]["input_shape"],
                          batch_sizes=batch_sizes, metadata=l.metadata,
                          **serving)
            for l in loaded]
  for row, model in zip(rows, served):
    # The served program's own accuracy (bf16, a conv lowering): its change
    # from the checkpoint's float accuracy is what serving costs.
    served_logits = model(split.images)
    row["serving_dtype"] = model.options["dtype"]
    row["served_accuracy"] = float(np.mean(np.argmax(served_logits, -1)
                                           == split.labels))
    row["served_accuracy_delta"] = row["served_accuracy"] - row["accuracy"]
  for batch in batch_sizes:
    results = interleaved_latency(served, batch, iters, warmup)
    for row, result in zip(rows, results):
      row[f"p50_ms_b{batch}"] = result["p50_ms"]
      row[f"p99_ms_b{batch}"] = result["p99_ms"]
      row[f"speedup_b{batch}"] = results[ref_index]["p50_ms"] / result["p50_ms"]
  for row in rows:
    row["reference"] = names[ref_index]
  return rows


def _lineage(metadata: dict) -> dict:
  """What pairs a distilled student with its from-scratch twin: the same
  architecture and training recipe, differing only in the seed."""
  train = dict(metadata.get("train") or {})
  train.pop("seed", None)
  return {"seed": metadata.get("seed"),
          "architecture": json.dumps(metadata["model"], sort_keys=True),
          "recipe": json.dumps(train, sort_keys=True)}


def distillation_vs_scratch(rows: list[dict]) -> str:
  """Each distilled architecture against the same architecture trained from
  scratch with the same recipe: test accuracy mean ± std over seeds, and the
  mean paired difference (same seed). Empty when no stage has a twin."""
  lines = []
  for arch in dict.fromkeys(r["architecture"] for r in rows
                            if r["stage_type"] == "distill"):
    distilled = [r for r in rows
                 if r["architecture"] == arch and r["stage_type"] == "distill"]
    scratch = {r["seed"]: r for r in rows if r["architecture"] == arch
               and r["stage_type"] == "train"
               and r["recipe"] == distilled[0]["recipe"]}
    pairs = [(d, scratch[d["seed"]]) for d in distilled if d["seed"] in scratch]
    if not pairs:
      continue
    d_acc = 100 * np.array([d["accuracy"] for d, _ in pairs])
    s_acc = 100 * np.array([s["accuracy"] for _, s in pairs])
    lines.append(
        f"| {', '.join(d['name'] for d, _ in pairs)} | "
        f"{', '.join(s['name'] for _, s in pairs)} | {pairs[0][0]['model']} "
        f"| {len(pairs)} | {d_acc.mean():.2f} ± {d_acc.std():.2f} | "
        f"{s_acc.mean():.2f} ± {s_acc.std():.2f} | "
        f"{(d_acc - s_acc).mean():+.2f} ± {(d_acc - s_acc).std():.2f} |")
  if not lines:
    return ""
  return ("\nDistillation against the same architecture trained from scratch "
          "(same recipe and steps, paired by seed; test accuracy %, mean ± "
          "std over seeds):\n\n| distilled | scratch | model | seeds | "
          "distilled | scratch | difference |\n" + "|" + " --- |" * 7 + "\n"
          + "\n".join(lines) + "\n")


def to_markdown(rows: list[dict], batch_sizes: Sequence[int],
                front: list[int]) -> str:
  head = ["stage", "model", "params (non-zero)", "FLOPs", "bytes", "dtypes",
          "test acc.", "served as: acc. (change)", "agreement", "KL"]
  for b in batch_sizes:
    head += [f"p50 ms b{b}", f"p99 ms b{b}", f"speedup b{b}"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for i, r in enumerate(rows):
    cells = [r["name"] + (" *" if i in front else ""), r["model"],
             f"{r['params']:,} ({r['nonzero_params']:,})", f"{r['flops']/1e6:.2f} M",
             f"{r['bytes']:,}", "/".join(r["dtypes"]), f"{100*r['accuracy']:.2f}%",
             f"{r['serving_dtype']}: {100*r['served_accuracy']:.2f}% "
             f"({100*r['served_accuracy_delta']:+.2f})",
             f"{r['agreement']:.4f}", f"{r['kl']:.4f}"]
    for b in batch_sizes:
      cells += [f"{r[f'p50_ms_b{b}']:.3f}", f"{r[f'p99_ms_b{b}']:.3f}",
                f"{r[f'speedup_b{b}']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\n* on the Pareto front (accuracy vs p99 latency)\n"


def plot(rows: list[dict], key: str, front: list[int], path: epath.Path,
         budget_ms: float | None = None) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  sizes = np.array([r["bytes"] for r in rows], float)
  marker = 40 + 400 * sizes / sizes.max()
  lat = [r[key] for r in rows]
  acc = [100 * r["accuracy"] for r in rows]
  ax.scatter(lat, acc, s=marker, alpha=0.6)
  for r, x, y in zip(rows, lat, acc):
    ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4))
  ax.plot([lat[i] for i in front], [acc[i] for i in front], "r--",
          label="Pareto front")
  if budget_ms is not None:
    ax.axvline(budget_ms, color="gray", linestyle=":", label=f"budget {budget_ms} ms")
  ax.set_xlabel(f"{key.replace('_', ' ')} (ms)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("accuracy vs tail latency (marker size = bytes on disk)")
  ax.legend(loc="lower right")
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def write_outputs(rows: list[dict], batch_sizes: Sequence[int],
                  out_dir: epath.PathLike, budget_ms: float | None = None,
                  results: epath.PathLike | None = None,
                  predicted: tuple[str, list[dict]] | None = None) -> dict:
  """compare.md, compare.json, compare.csv and compare.png in out_dir; with
  `results`, also the table under its provenance header there (and the plot
  beside it, same name .png): what experiments/results/ holds. `predicted`:
  (markdown, rows) for a TPU slice (rtjax.target), its own section."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  key = f"p99_ms_b{batch_sizes[0]}"
  front = pareto_front([(r["accuracy"], r[key]) for r in rows])
  best = best_under_budget(rows, budget_ms, key) if budget_ms else None
  table = to_markdown(rows, batch_sizes, front) + distillation_vs_scratch(rows)
  if budget_ms is not None:
    table += (f"\nMost accurate under {budget_ms} ms ({key}): "
              f"{best['name'] if best else 'none fits'}\n")
  if predicted:
    table += "\n" + predicted[0]
  (out_dir / "compare.md").write_text(table)
  summary = {"rows": rows, "pareto_front": [rows[i]["name"] for i in front],
             "latency_key": key, "budget_ms": budget_ms,
             "best_under_budget": best["name"] if best else None,
             "predicted": predicted[1] if predicted else None}
  (out_dir / "compare.json").write_text(json.dumps(summary, indent=1))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  (out_dir / "compare.csv").write_text(buffer.getvalue())
  plot(rows, key, front, out_dir / "compare.png", budget_ms)
  if results:
    path = provenance.write_results(results, table)
    (out_dir / "compare.png").copy(path.with_suffix(".png"), overwrite=True)
  summary["markdown"] = table
  return summary
