"""The accelerator check: on whatever device jax finds, serve each image
family at f32, bf16 and int8 and time it against the peers available there,
all in one table, within a few minutes (a short accelerator lease).

The default CNN is trained (its tiny config: a real checkpoint through the
real loop); LeNet-5 and the ViT are served from a fresh initialization,
since latency does not depend on the weights' values. Every served program's
logits are checked against the float model's before anything is timed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from rtjax.bench import peers
from rtjax.bench.latency import interleaved_latency
from rtjax.checkpoint import load_checkpoint
from rtjax.compress import quantize
from rtjax.data import dataset_spec
from rtjax.infer import CompiledModel
from rtjax.infer.options import device_kind
from rtjax.models import create_model
from rtjax.train import train_and_evaluate
from rtjax.train.trainer import model_spec

DTYPES = ("float32", "bfloat16", "int8")
# How far bf16 / int8 logits may stray from f32 ones (max |difference| over
# the logits' largest magnitude) before the check fails.
REDUCED_TOLERANCE = {"bfloat16": 0.05, "int8": 0.25}
# f32 agreement with the CPU peers: exact-ish on a CPU; accelerators' f32
# matmuls default to TF32 (GPU) or bf16 passes (TPU).
PEER_ATOL = {"cpu": 1e-4, "gpu": 5e-2, "tpu": 5e-2}


@dataclasses.dataclass
class Family:
  label: str
  config: object  # ml_collections ConfigDict
  train: bool  # train it (else a fresh initialization)
  checkpoint: str | None = None  # serve this trained one instead


def build(family: Family, workdir) -> tuple[object, dict]:
  """(float model, spec) of a family: its checkpoint, trained into workdir,
  or initialized."""
  if family.train or family.checkpoint:
    if not family.checkpoint:
      train_and_evaluate(family.config, workdir)
    model, metadata = load_checkpoint(family.checkpoint or workdir)
    return model, metadata["model"]
  spec = model_spec(family.config.model, dataset_spec(family.config.data))
  return create_model(spec["name"], spec["args"], family.config.seed), spec


def variants(model, spec: dict, batches) -> dict[str, CompiledModel]:
  """{dtype: CompiledModel} at f32, bf16 and int8 (qwix w8a8, dynamic),
  each with this kind of device's default serving options."""
  shape = spec["args"]["input_shape"]
  int8, qspec = quantize.ptq(model, shape)
  return {"float32": CompiledModel(model, shape, batch_sizes=batches,
                                   spec=spec),
          "bfloat16": CompiledModel(model, shape, batch_sizes=batches,
                                    spec=spec, dtype="bfloat16"),
          "int8": CompiledModel(int8, shape, batch_sizes=batches,
                                spec={**spec, "quantization": qspec})}


def deviation(served: dict[str, CompiledModel], shape) -> dict[str, float]:
  """Max |logit - f32 logit| / max |f32 logit| per dtype, on random inputs."""
  x = np.random.default_rng(1).normal(
      size=(min(served["float32"].batch_sizes[-1], 64), *shape)).astype(
          np.float32)
  reference = served["float32"](x)
  scale = float(np.abs(reference).max()) or 1.0
  return {dtype: float(np.abs(model(x) - reference).max()) / scale
          for dtype, model in served.items()}


def run(families: list[Family], workdir, batches=(1, 256), iters: int = 100,
        warmup: int = 10, torch_compile: bool = True,
        budget_s: float = 200.0, log=print) -> dict:
  """Rows of the table (and failures); `budget_s`: past it, the remaining
  torch.compile runs are skipped (noted) so the check stays short."""
  start, kind = time.perf_counter(), device_kind()
  device = jax.devices()[0]
  torch_device = "cpu"
  try:
    import torch
    if kind == "gpu" and torch.cuda.is_available():
      torch_device = "cuda"
  except ImportError:
    pass
  rows, failures, notes = [], [], []
  for family in families:
    model, spec = build(family, f"{workdir}/{family.label}")
    shape = spec["args"]["input_shape"]
    served = variants(model, spec, batches)
    drift = deviation(served, shape)
    for dtype, tolerance in REDUCED_TOLERANCE.items():
      if drift[dtype] > tolerance:
        failures.append(f"{family.label} {dtype}: logits {drift[dtype]:.3f} "
                        f"of their scale from f32's (> {tolerance})")
    log(f"{family.label}: compiled f32/bf16/int8 at batches {list(batches)}; "
        f"logit drift vs f32: " + ", ".join(f"{d} {v:.4f}"
                                           for d, v in drift.items()))
    for batch in batches:
      latency = dict(zip(served, interleaved_latency(
          list(served.values()), batch, iters, warmup)))
      compile_ok = torch_compile and time.perf_counter() - start < budget_s
      if torch_compile and not compile_ok:
        notes.append(f"{family.label} batch {batch}: torch.compile skipped "
                     f"(past the {budget_s:.0f} s budget)")
      try:
        result = peers.compare_peers(
            served["float32"], model, spec, batch, iters, warmup,
            atol=PEER_ATOL.get(kind, 5e-2), torch_compile=compile_ok,
            torch_device=torch_device)
        peer = {name: r["p50_ms"] for name, r in result["contenders"].items()
                if name != "rtjax"}
        notes += [f"{family.label} batch {batch}: {n}" for n in result["notes"]]
      except AssertionError as e:  # a peer disagreed: report, keep going
        peer = {}
        failures.append(f"{family.label} batch {batch}: "
                        f"{str(e).strip().splitlines()[0]}")
      rows.append({"family": family.label, "batch": batch,
                   **{f"{d}_p50_ms": latency[d]["p50_ms"] for d in served},
                   **{f"{d}_p99_ms": latency[d]["p99_ms"] for d in served},
                   "drift": drift, "peers_p50_ms": peer})
      log(table([rows[-1]]).splitlines()[-1])
  return {"device": f"{device.device_kind} ({device.platform}, "
                    f"{jax.device_count()} device(s))",
          "torch_device": torch_device, "rows": rows, "failures": failures,
          "notes": notes, "seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
  """One markdown row per family and batch: p50 (p99) per dtype, the
  bf16/int8 speedup over f32, and each peer's p50 with f32 rtjax's ratio."""
  lines = ["| family | batch | f32 p50 (p99) ms | bf16 p50 (p99) ms | "
           "int8 p50 (p99) ms | peers p50 ms (rtjax f32 p50 / theirs) |",
           "|" + " --- |" * 6]
  for r in rows:
    cells = [r["family"], str(r["batch"])]
    for dtype in DTYPES:
      speed = (f", {r['float32_p50_ms'] / r[f'{dtype}_p50_ms']:.2f}x"
               if dtype != "float32" else "")
      cells.append(f"{r[f'{dtype}_p50_ms']:.4f} ({r[f'{dtype}_p99_ms']:.4f})"
                   f"{speed}")
    cells.append("; ".join(f"{name} {p50:.4f} ({r['float32_p50_ms'] / p50:.2f})"
                           for name, p50 in r["peers_p50_ms"].items()) or "none")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
