"""Text from a decoder language model's checkpoint, streamed as it is
generated, then its time to first token and time per output token.

  python -m experiments.generate --checkpoint=workdirs/lm/cpu --prompt="ROMEO:"
  python -m experiments.generate --checkpoint=workdirs/lm/cpu --prompt="ROMEO:" \\
      --temperature=0.8 --top_p=0.95 --seed=1 --num_samples=4 --stop=$'\\n\\n'

  python -m experiments.generate --checkpoint=workdirs/compress_lm/teacher \
      --draft=workdirs/compress_lm/distilled --speculate=4 --prompt="ROMEO:"

The model runs in rtjax.infer.engine (prefill, a compiled generate step
over a KV cache, its twin past half the cache; with --draft, a round of
speculative decoding);
--num_samples requests (seeds seed, seed + 1, ...) share its slots, the
first streamed, the others printed as they end.
"""

import sys

from absl import flags

from experiments import cli
from rtjax.infer import generation, scheduler
from rtjax.infer import engine as engine_lib
from rtjax.infer.sampling import Sampling

_CHECKPOINT = cli.define_checkpoint()
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue; every "
                              "character must be in the model's vocabulary.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Tokens to generate at "
                                   "most (the context may end it sooner).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", Sampling.top_k, "Sample from the k "
                              "most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", Sampling.top_p, "Sample from the "
                            "smallest set of tokens whose probability "
                            "reaches p (1: all).")
_SEED = flags.DEFINE_integer("seed", Sampling.seed, "Sample i uses seed + i.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples, generated "
                                    "side by side in as many slots.")
_STOP = flags.DEFINE_multi_string("stop", list(generation.Request.stop),
                                  "End a sample at this text (not "
                                  "printed); repeatable.")
_KV_CACHE = flags.DEFINE_enum("kv_cache", None, ["float", "int8"], "How the "
                              "KV cache stores keys and values: float (the "
                              "serving dtype) or int8 with a scale per token "
                              "and head. Default: the checkpoint's choice for "
                              "this kind of device, else float.")
_DRAFT = flags.DEFINE_string("draft", "", "A draft decoder's checkpoint (same "
                             "vocabulary): speculative decoding, the same "
                             "text when greedy, the same distribution when "
                             "sampled.")
_SPECULATE = flags.DEFINE_integer("speculate", 4, "Tokens the draft proposes "
                                  "a round (`experiments.bench "
                                  "--drafts` measures the best k).",
                                  lower_bound=1)
_SERVING = cli.ServingFlags()


def load_draft(vocabulary: str) -> dict:
  """The Engine's draft arguments from --draft (none without it)."""
  if not _DRAFT.value:
    return {}
  draft, _, metadata = engine_lib.load_decoder(_DRAFT.value)
  if engine_lib.vocabulary_of(metadata) != vocabulary:
    raise cli.FlagError(f"--draft {_DRAFT.value} was trained on another "
                        "vocabulary than --checkpoint's")
  return {"draft": draft, "speculate": _SPECULATE.value}


def main(argv):
  del argv
  serving = _SERVING.setup()
  if _NUM_SAMPLES.value < 1:
    raise cli.FlagError("--num_samples must be at least 1")
  model, context, metadata = engine_lib.load_decoder(_CHECKPOINT.value)
  vocabulary = engine_lib.vocabulary_of(metadata)
  engine_lib.encode(vocabulary, _PROMPT.value)
  requests = [generation.Request(
      _PROMPT.value, _MAX_TOKENS.value,
      Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
               _SEED.value + i), tuple(_STOP.value))
      for i in range(_NUM_SAMPLES.value)]
  engine = engine_lib.Engine(model, context, metadata, slots=len(requests),
                             dtype=serving["dtype"],
                             dot_kernels=serving["dot_kernels"],
                             kv_cache=_KV_CACHE.value,
                             **load_draft(vocabulary))

  def show(index, text):
    if index == 0:
      sys.stdout.write(text)
      sys.stdout.flush()

  sys.stdout.write(_PROMPT.value)
  completions = scheduler.run(engine, requests, on_text=show)
  for i, done in enumerate(completions[1:], 1):
    sys.stdout.write(f"\n--- sample {i} (seed {_SEED.value + i}) ---\n"
                     f"{_PROMPT.value}{done.text}")
  stats = generation.summary(completions)
  print(f"\n\n{stats['tokens']} tokens in {len(completions)} sample(s); "
        f"TTFT {stats['ttft_ms_p50']:.1f} ms; TPOT "
        f"{stats.get('tpot_ms_p50', float('nan')):.2f} ms; "
        f"{stats['tokens_per_s']:.0f} tokens/s "
        f"(compiled in {sum(engine.compile_seconds.values()):.1f} s)"
        + (f"; {engine.acceptance:.0%} of drafted tokens accepted"
           if engine.speculate else ""))


if __name__ == "__main__":
  cli.run(main)
