"""Speculative decoding measured per draft: each draft's own quality, its
cost per token relative to the target, its greedy acceptance rate at each
k, and the speedup Leviathan et al.'s formula predicts from those two beside
the speedup measured, all at batch 1 on fixed prompts, every engine timed in
turns with the target alone. The greedy text must equal the target's; a
divergence is reported with the target's top-2 logit gap where it parts.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from rtjax.bench.generation import full_forward, recomputed_greedy
from rtjax.checkpoint import run_name
from rtjax.infer import generation, scheduler
from rtjax.infer.engine import Engine, load_decoder


def predicted_speedup(acceptance: float, cost: float, k: int) -> float:
  """Leviathan et al.'s expected speedup: (1 - a^(k+1)) / ((1 - a)(k c + 1))
  tokens per target step, for acceptance rate a and draft cost c per
  token relative to the target (a verification costing one step)."""
  if acceptance >= 1:
    return (k + 1) / (k * cost + 1)
  return (1 - acceptance ** (k + 1)) / ((1 - acceptance) * (k * cost + 1))


def _divergences(model, engine: Engine, done, reference) -> list[float]:
  """The target's top-2 logit gap where each speculative text parts from
  the target's own."""
  forward, gaps = full_forward(model), []
  for mine, theirs in zip(done, reference):
    if mine.tokens != theirs.tokens:
      step = next(i for i, (a, b) in enumerate(zip(mine.tokens, theirs.tokens))
                  if a != b)
      ids = engine.encode(mine.request.prompt)
      gaps.append(recomputed_greedy(forward, ids, step + 1,
                                    engine.context)[1][step])
  return gaps


def _in_turns(engines: dict, requests, rounds: int):
  """Each engine's tokens/s and TPOT p50 (ms) per round, in turns; the
  speculative engines' acceptance counted afresh."""
  speed, tpot = collections.defaultdict(list), collections.defaultdict(list)
  for _ in range(rounds):
    for key, engine in engines.items():
      engine.drafted = engine.accepted = 0
      stats = generation.summary(scheduler.run(engine, requests))
      speed[key].append(stats["tokens_per_s"])
      tpot[key].append(stats["tpot_ms_p50"])
  return speed, tpot


def measure(model, context: int, metadata: dict, drafts: Sequence[str],
            ks: Sequence[int], texts: Sequence[str], count: int, rounds: int,
            options: dict) -> list[dict]:
  """A row per (draft, k) at batch 1: acceptance, tokens/s against the
  target alone's (medians of `rounds` turns after an untimed one), the
  predicted speedup, greedy divergences."""
  requests = [generation.Request(t, count) for t in texts]
  engine = lambda m, meta, **kw: Engine(m, context, meta, slots=1, **options,
                                        **kw)
  loaded = {run_name(p): load_decoder(p) for p in drafts}
  engines = {"target": engine(model, metadata)}
  for name, (draft, _, meta) in loaded.items():
    engines[name] = engine(draft, meta)  # alone: its cost per token
    for k in ks:
      engines[name, k] = engine(model, metadata, draft=draft, speculate=k)
  first = {key: scheduler.run(e, requests) for key, e in engines.items()}
  speed, tpot = _in_turns(engines, requests, rounds)
  median = lambda values: float(np.median(values))
  rows = []
  for name, (_, _, meta) in loaded.items():
    cost = median(tpot[name]) / median(tpot["target"])
    for k in ks:
      acceptance = engines[name, k].acceptance
      rows.append({
          "draft": name, "k": k, "type": meta.get("stage_type", "train"),
          "depth": meta["model"]["args"]["depth"],
          "params": meta["param_count"],
          "bits_per_char": meta["metrics"]["test"]["bits_per_token"],
          "cost": cost, "acceptance": acceptance,
          "tokens_per_s": median(speed[name, k]),
          "target_tokens_per_s": median(speed["target"]),
          "speedup": median(np.array(speed[name, k]) /
                            np.array(speed["target"])),
          "predicted": predicted_speedup(acceptance, cost, k),
          "divergences": _divergences(model, engines[name, k],
                                      first[name, k], first["target"])})
      print(f"{name} k={k}: acceptance {acceptance:.3f}, "
            f"{rows[-1]['tokens_per_s']:.0f} tokens/s, speedup "
            f"{rows[-1]['speedup']:.2f}x (predicted "
            f"{rows[-1]['predicted']:.2f}x)", flush=True)
  return rows


def markdown(rows: list[dict], metadata: dict, prompts: int, count: int,
             rounds: int) -> str:
  """Per draft its best k (by measured speedup); then acceptance and
  speedups at every k."""
  bits = metadata["metrics"]["test"]["bits_per_token"]
  lines = [f"Speculative decoding at batch 1: {prompts} prompts x {count} "
           f"greedy tokens, every engine in turns with the target alone "
           f"({metadata['model']['args']['depth']} blocks, "
           f"{metadata['param_count']:,} parameters, {bits:.3f} bits/char), "
           f"medians of {rounds} rounds. Cost: the draft's own TPOT over "
           f"the target's. Predicted: Leviathan et al.'s formula from the "
           f"measured acceptance and cost.", "",
           "| draft | made by | blocks | parameters | test bits/char | cost "
           "per token | best k | acceptance | tokens/s (target alone) | "
           "speedup measured | speedup predicted | greedy text |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
           "--- | --- |"]
  for name in dict.fromkeys(r["draft"] for r in rows):
    r = max((r for r in rows if r["draft"] == name),
            key=lambda r: r["speedup"])
    same = prompts - len(r["divergences"])
    parted = (f"; {len(r['divergences'])} part at gaps "
              f"{', '.join(f'{g:.1e}' for g in r['divergences'])}"
              if r["divergences"] else "")
    lines.append(
        f"| {name} | {r['type']} | {r['depth']} | {r['params']:,} | "
        f"{r['bits_per_char']:.3f} | {r['cost']:.2f} | {r['k']} | "
        f"{r['acceptance']:.3f} | {r['tokens_per_s']:.0f} "
        f"({r['target_tokens_per_s']:.0f}) | **{r['speedup']:.2f}x** | "
        f"{r['predicted']:.2f}x | {same}/{prompts} identical{parted} |")
  ks = sorted({r["k"] for r in rows})
  lines += ["", "At each k: acceptance; speedup measured (predicted).", "",
            "| draft | " + " | ".join(f"k={k}" for k in ks) + " |",
            "| --- |" + " --- |" * len(ks)]
  for name in dict.fromkeys(r["draft"] for r in rows):
    cells = [f"{r['acceptance']:.3f}; {r['speedup']:.2f}x "
             f"({r['predicted']:.2f}x)" for k in ks for r in rows
             if r["draft"] == name and r["k"] == k]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
