"""Generation measured as a user waits for it: time to first token (TTFT)
per prompt-length bucket, time per output token (TPOT, MLPerf's: (last
token time - first token time) / (tokens - 1) per request) and tokens/s, at
1 and N slots, the time per generate step as the context fills against the
FLOPs' prediction, greedy tokens against recomputing the prefix, and a
PyTorch twin with its own KV cache on the same weights, in turns.

Prompts are windows of the checkpoint's own test text. Each step prints its
lines and returns rows for the results file.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.bench import breakdown, torch_decoder
from rtjax.compress import quantize
from rtjax.data import tokens
from rtjax.infer import generation, scheduler
from rtjax.infer.engine import Engine
from rtjax.models import decoder


def _ms(values) -> dict[str, float]:
  values = np.asarray(values, np.float64) * 1e3
  return {"p50_ms": float(np.percentile(values, 50)),
          "p99_ms": float(np.percentile(values, 99))}


def prompts(stream: np.ndarray, count: int, length: int,
            vocabulary: str) -> list[str]:
  """`count` different windows of `length` characters of a token stream."""
  starts = np.linspace(0, len(stream) - length - 1, count).astype(int)
  return [tokens.decode(vocabulary, stream[s:s + length]) for s in starts]


def ttft_by_bucket(engine: Engine, stream: np.ndarray, repeats: int,
                   peaks: dict) -> list[dict]:
  """Per prompt-length bucket, prompts of that length run alone (the first
  untimed): TTFT p50/p99 beside the prefill executable's predicted time
  (XLA's cost analysis over this machine's peaks)."""
  rows = []
  for bucket in engine.buckets:
    length = min(bucket, engine.context - 1)
    requests = [generation.Request(p, max_tokens=1) for p in
                prompts(stream, repeats + 1, length, engine.vocabulary)]
    ttft = [scheduler.run(engine, [r])[0].ttft_s for r in requests][1:]
    predicted = breakdown.breakdown(engine.executables[f"prefill/{bucket}"],
                                    peaks)["t_predicted_s"]
    rows.append({"prompt": length, "bucket": bucket, **_ms(ttft),
                 "predicted_ms": predicted * 1e3})
    print(f"TTFT prompt {length:>4}: p50 {rows[-1]['p50_ms']:.2f} ms, p99 "
          f"{rows[-1]['p99_ms']:.2f} ms (predicted {predicted * 1e3:.2f} ms)",
          flush=True)
  return rows


def step_time_by_context(engine: Engine, model, stream: np.ndarray,
                         contexts: Sequence[int], window: int, rounds: int
                         ) -> list[dict]:
  """Time per generate step with every slot holding a request whose prompt
  ends `window` tokens short of each context length, so the steps timed
  (those after the last slot's first token) feed positions just under it;
  the contexts in turns for `rounds`; against the ratio one step's FLOPs
  predict from the cache chunks its attention reads there
  (rtjax.models.decoder.step_flops)."""
  steps = {context: [] for context in contexts}
  for turn in range(rounds + 1):  # the first turn warms up, untimed
    for context in contexts:
      length = max(1, context - window)
      texts = prompts(stream, engine.slots * (rounds + 1), length,
                      engine.vocabulary)[turn::rounds + 1]
      done = scheduler.run(engine, [generation.Request(
          t, max_tokens=context - length) for t in texts])
      last_insert = max(c.token_times[0] for c in done)
      if turn:
        steps[context] += list(np.diff([last_insert,
                                        *done[0].token_times[1:]]))
  rows = []
  for context in contexts:
    keys = decoder.keys_read(context - 2, engine.context)
    matmuls, attention = decoder.step_flops(model, keys)
    rows.append({"context": context, "keys_read": keys,
                 **_ms(steps[context]), "flops": matmuls + attention,
                 "attention_share": attention / (matmuls + attention)})
  for row in rows:
    row["measured_ratio"] = row["p50_ms"] / rows[0]["p50_ms"]
    row["predicted_ratio"] = row["flops"] / rows[0]["flops"]
    print(f"generate step at context {row['context']:>4} ({engine.slots} "
          f"slots): p50 {row['p50_ms']:.3f} ms, x{row['measured_ratio']:.2f} "
          f"measured, x{row['predicted_ratio']:.2f} predicted by FLOPs",
          flush=True)
  return rows


def full_forward(model):
  """The model's logits over a whole (1, T) sequence, no cache: jitted
  (split and merged, as a qwix model changes itself when called)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens))
  return lambda tokens: forward(state, tokens)


def recomputed_greedy(forward, prompt: np.ndarray, count: int, context: int
                      ) -> tuple[list[int], list[float]]:
  """`count` greedy tokens by running `forward` (full_forward) over the
  whole prefix for each, and each step's gap between its two largest
  logits."""
  sequence, out, gaps = list(prompt), [], []
  for _ in range(count):
    padded = np.zeros((1, context), np.int32)  # causal: padding is unseen
    padded[0, :len(sequence)] = sequence
    logits = np.asarray(forward(padded))[0, len(sequence) - 1]
    top2 = np.sort(logits)[-2:]
    out.append(int(np.argmax(logits)))
    gaps.append(float(top2[1] - top2[0]))
    sequence.append(out[-1])
  return out, gaps


def greedy_agreement(engine: Engine, model, texts: Sequence[str], count: int,
                     twin=None) -> dict:
  """The engine's greedy tokens for `texts` against recomputing the whole
  prefix for each token (and against the PyTorch twin, when given): per
  reference, the sequences identical and, where one parts, its step and
  the recomputed top-2 logit gap there (a near tie that float rounding may
  break either way)."""
  ours = scheduler.run(engine, [generation.Request(t, count) for t in texts])
  prompts_ids = [engine.encode(t) for t in texts]
  forward = full_forward(model)
  recomputed = [recomputed_greedy(forward, ids, count, engine.context)
                for ids in prompts_ids]
  others = {"recomputed": [sequence for sequence, _ in recomputed]}
  if twin is not None:
    others["torch twin"] = list(torch_decoder.greedy(
        twin, np.stack(prompts_ids), count)[0])
  result = {"sequences": len(texts), "tokens": count}
  for name, sequences in others.items():
    partings = []
    for row, (done, theirs) in enumerate(zip(ours, sequences)):
      differ = np.flatnonzero(np.asarray(done.tokens) != np.asarray(theirs))
      if len(differ):
        step = int(differ[0])
        _, gaps = recomputed_greedy(forward, np.concatenate(
            [prompts_ids[row], done.tokens[:step]]), 1, engine.context)
        partings.append({"prompt": row, "step": step, "top2_gap": gaps[0]})
    result[name] = partings
    print(f"greedy, engine vs {name}, {len(texts)} prompts x {count} tokens:"
          f" {len(texts) - len(partings)} identical; partings {partings}",
          flush=True)
  return result


def slots_against_twin(engines: dict[int, Engine], twin, texts: Sequence[str],
                       count: int, rounds: int) -> list[dict]:
  """For each slot count n: n prompts of `texts` generating `count` greedy
  tokens each on the engine (n slots) and on the twin (a batch of n), the
  two in turns for `rounds` after one untimed: TPOT p50/p99 and tokens/s
  of each (the engine prefills its prompts one by one, the twin as one
  batch)."""
  rows = []
  for slots, engine in engines.items():
    chosen = list(texts[:slots])
    ids = np.stack([engine.encode(t) for t in chosen])
    tpot = {"rtjax": [], "torch": []}
    rate = {"rtjax": [], "torch": []}
    for turn in range(rounds + 1):  # the first turn warms up, untimed
      done = scheduler.run(engine, [generation.Request(t, count)
                                     for t in chosen])
      start = time.perf_counter()
      _, times = torch_decoder.greedy(twin, ids, count)
      if turn:
        tpot["rtjax"] += [c.tpot_s for c in done]
        rate["rtjax"].append(generation.summary(done)["tokens_per_s"])
        tpot["torch"] += [(times[-1] - times[0]) / (count - 1)] * slots
        rate["torch"].append(slots * count / (times[-1] - start))
    for who in ("rtjax", "torch"):
      rows.append({"slots": slots, "who": who, **_ms(tpot[who]),
                   "tokens_per_s": float(np.median(rate[who]))})
    ratio = rows[-2]["p50_ms"] / rows[-1]["p50_ms"]
    rows[-2]["tpot_vs_torch"] = ratio
    print(f"{slots} slot(s), {count} tokens: TPOT p50 rtjax "
          f"{rows[-2]['p50_ms']:.3f} ms, torch {rows[-1]['p50_ms']:.3f} ms "
          f"(ratio {ratio:.2f}); tokens/s {rows[-2]['tokens_per_s']:.0f} vs "
          f"{rows[-1]['tokens_per_s']:.0f}", flush=True)
  return rows


def loss_through_cache(engine: Engine, windows: np.ndarray, prefix: int,
                       batch: int = 32) -> float:
  """Bits per token teacher-forced through the engine's decode path: each
  window's first `prefix` tokens prefilled into a cache of the engine's
  kind, then every next true token fed one at a time, each step reading
  the cache; scored on every prediction of the window."""
  graphdef = engine.graphdef

  @jax.jit
  def nats(weights, inputs, targets):
    rows, tokens = inputs.shape
    call = lambda *args: nnx.merge(graphdef, weights)(*args)
    cache = engine.empty_cache(rows)
    logits, cache = call(inputs[:, :prefix], cache, jnp.zeros(rows, jnp.int32))

    def step(cache, t):
      out, cache = call(jax.lax.dynamic_slice_in_dim(inputs, t, 1, 1), cache,
                        jnp.full(rows, t, jnp.int32))
      return cache, out[:, 0]

    _, rest = jax.lax.scan(step, cache, jnp.arange(prefix, tokens))
    logits = jnp.concatenate([logits, rest.transpose(1, 0, 2)], axis=1)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], -1).sum()

  total = sum(float(nats(engine.weights, windows[i:i + batch, :-1],
                         windows[i:i + batch, 1:]))
              for i in range(0, len(windows), batch))
  return total / (windows.shape[0] * (windows.shape[1] - 1)) / np.log(2)


def precision_rows(engines: dict[str, Engine], windows: np.ndarray,
                   texts: Sequence[str], count: int, rounds: int
                   ) -> list[dict]:
  """Per served precision (name -> engine, the first the reference): loss
  through its cache (loss_through_cache, prefix 16), cache bytes, and TPOT
  with every slot generating `count` tokens, the engines in turns for
  `rounds` after one untimed."""
  tpot = {name: [] for name in engines}
  for turn in range(rounds + 1):
    for name, engine in engines.items():
      done = scheduler.run(engine, [generation.Request(t, count)
                                     for t in texts[:engine.slots]])
      if turn:
        tpot[name] += [c.tpot_s for c in done]
  rows = [{"served": name, "bits": loss_through_cache(engine, windows, 16),
           "cache_bytes": engine.cache_bytes, **_ms(tpot[name])}
          for name, engine in engines.items()]
  for row in rows:
    row["bits_change"] = row["bits"] / rows[0]["bits"] - 1
    row["cache_ratio"] = row["cache_bytes"] / rows[0]["cache_bytes"]
    row["tpot_ratio"] = row["p50_ms"] / rows[0]["p50_ms"]
    print(f"{row['served']:<26} {row['bits']:.4f} bits/char through the "
          f"cache ({100 * row['bits_change']:+.2f}%), cache "
          f"x{row['cache_ratio']:.2f}, TPOT p50 {row['p50_ms']:.3f} ms "
          f"(x{row['tpot_ratio']:.2f})", flush=True)
  return rows


def precisions_table(model, context: int, metadata: dict, options: dict,
                     stream: np.ndarray, texts: Sequence[str], count: int,
                     rounds: int) -> str:
  """float32, bfloat16, int8 weights (qwix w8 PTQ), an int8 KV cache and
  both, served by engines with `options` (a mesh, dot kernels, slots):
  precision_rows on 64 test windows, as markdown."""
  int8_model, _ = quantize.ptq(model, [context], "w8")
  served = {"float32": (model, {}), "bfloat16": (model, {"dtype": "bfloat16"}),
            "int8 weights": (int8_model, {}),
            "int8 KV cache": (model, {"kv_cache": "int8"}),
            "int8 weights + int8 KV cache": (int8_model, {"kv_cache": "int8"})}
  options = {k: v for k, v in options.items() if k != "dtype"}
  engines = {name: Engine(m, context, metadata, **options, **extra)
             for name, (m, extra) in served.items()}
  inputs, targets = tokens.windows(stream, context)
  windows = np.concatenate([inputs, targets[:, -1:]], axis=1)[:64]
  rows = precision_rows(engines, windows, texts, count, rounds)
  return precision_markdown(rows, windows, engines["float32"].slots, count)


def precision_markdown(rows: list[dict], windows: np.ndarray, slots: int,
                       count: int) -> str:
  lines = ["", f"Served precisions: test bits/char teacher-forced through "
           f"each one's decode path ({windows.shape[0]} test windows of "
           f"{windows.shape[1] - 1} characters: 16 prefilled, then a "
           f"generate step per character, each reading the cache), cache "
           f"bytes per slot, and TPOT with {slots} slots generating {count} "
           "tokens each, in turns:", "",
           "| served | bits/char through the cache | change | cache bytes "
           "per slot | cache vs float32 | TPOT p50 ms | TPOT p99 ms | "
           "TPOT vs float32 |", "|" + " --- |" * 8]
  lines += [f"| {r['served']} | {r['bits']:.4f} | "
            f"{100 * r['bits_change']:+.2f}% | {r['cache_bytes']:,} | "
            f"{r['cache_ratio']:.2f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {r['tpot_ratio']:.2f} |" for r in rows]
  return "\n".join(lines) + "\n"


def markdown(engine: Engine, ttft: list[dict], by_context: list[dict],
             agreement: dict | None, against: list[dict],
             step_predicted_s: float) -> str:
  """The tables; `step_predicted_s`: the generate executable's predicted
  time (XLA's cost analysis, which counts its attention loop's body
  once)."""
  compiled = ", ".join(f"{n} {s:.1f} s"
                       for n, s in engine.compile_seconds.items())
  lines = [f"Executables compiled once each ({len(engine.executables)}, "
           f"ahead of time): {compiled}. `generate` served the positions "
           "below half the cache, `generate/whole` those past it.", "",
           "| prompt tokens | bucket | TTFT p50 ms | TTFT p99 ms | "
           "predicted prefill ms (cost analysis) |", "|" + " --- |" * 5]
  lines += [f"| {r['prompt']} | {r['bucket']} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['predicted_ms']:.2f} |" for r in ttft]
  lines += ["", f"Time per generate step as the context fills "
            f"({engine.slots} slots, each step feeding positions just under "
            "the context). Predicted from XLA's cost analysis over this "
            f"machine's peaks (its attention loop counted once): "
            f"{step_predicted_s * 1e3:.3f} ms.", "",
            "| context | cache positions read | step p50 ms | step p99 ms | "
            "measured ratio to the first | predicted ratio (step FLOPs) | "
            "attention share of step FLOPs |", "|" + " --- |" * 7]
  lines += [f"| {r['context']} | {r['keys_read']} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['measured_ratio']:.2f} | "
            f"{r['predicted_ratio']:.2f} | {100 * r['attention_share']:.0f}% |"
            for r in by_context]
  if against:
    lines += ["", "Greedy decoding beside the PyTorch twin (its own KV "
              "cache, scaled_dot_product_attention; eager, "
              "torch.inference_mode), in turns:", "",
              "| slots (batch) | engine | TPOT p50 ms | TPOT p99 ms | "
              "tokens/s | TPOT / torch's |", "|" + " --- |" * 6]
    lines += [f"| {r['slots']} | {r['who']} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {r['tokens_per_s']:.0f} | "
              + (f"{r['tpot_vs_torch']:.2f} |" if "tpot_vs_torch" in r
                 else "- |") for r in against]
  if agreement:
    lines += ["", f"Greedy tokens checked first, {agreement['sequences']} "
              f"prompts x {agreement['tokens']} tokens, the engine against:"]
    for name, partings in agreement.items():
      if isinstance(partings, list):
        lines.append(
            f"- {name}: {agreement['sequences'] - len(partings)} identical; "
            "where one parts (step, top-2 logit gap of the recomputed "
            "prefix): " + (", ".join(f"{p['step']} ({p['top2_gap']:.2g})"
                                      for p in partings) or "none"))
  return "\n".join(lines) + "\n"


def tables(model, context: int, metadata: dict, options: dict,
           stream: np.ndarray, texts: Sequence[str], slots: int, count: int,
           rounds: int, peers: bool, precisions: bool) -> str:
  """Every measurement above on the decoder at `slots` slots (and the
  fewest its mesh allows), `texts` prompting `count` tokens each; the twin
  with `peers`, the precisions table with `precisions`."""
  fewest = options["mesh"].shape["data"]  # slots split over the data axis
  engines = {n: Engine(model, context, metadata, slots=n, **options)
             for n in sorted({fewest, slots})}
  engine = engines[slots]
  twin = torch_decoder.decoder_twin(model) if peers else None
  agreement = greedy_agreement(engine, model, texts, count, twin)
  peaks = breakdown.measure_peaks()
  ttft = ttft_by_bucket(engines[fewest], stream, len(texts), peaks)
  contexts = sorted({c for c in (16, 64, 128, 256) if c < context}
                    | {context})
  by_context = step_time_by_context(engine, model, stream, contexts, 16,
                                    rounds)
  against = (slots_against_twin(engines, twin, texts, count, rounds)
             if twin is not None else [])
  step = breakdown.breakdown(engine.executables["generate"], peaks)
  table = markdown(engine, ttft, by_context, agreement, against,
                   step["t_predicted_s"])
  if precisions:
    table += precisions_table(model, context, metadata,
                              {**options, "slots": slots}, stream, texts,
                              count, rounds)
  return table
