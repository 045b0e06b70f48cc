"""The decoding engine (rtjax.infer.engine) and the request loop over its
slots (rtjax.infer.generation): greedy tokens equal recomputing the whole
prefix, a seed's text does not depend on its neighbours, stop strings and
limits end requests, int8 weights decode through the cache, speculative
decoding keeps the target's greedy text and its sampling distribution, and
experiments.generate streams text or refuses a prompt in one line."""

import collections
import functools
import json

import jax
import numpy as np
import pytest
from scipy import stats

from rtjax import models
from rtjax.bench.generation import (full_forward, loss_through_cache,
                                    recomputed_greedy)
from rtjax.compress import quantize
from rtjax.errors import FlagError, InputError
from rtjax.data import tokens
from rtjax.infer import generation, sampling as sampling_lib, scheduler, speculative
from rtjax.infer.engine import Engine
from rtjax.infer.sampling import Sampling
from tests.conftest import run_module

VOCABULARY = "abcdefghijklmnopqrstuvwxyz .,\n"
CONTEXT = 128  # two chunks of the cache's attention loop
ARGS = {"num_classes": len(VOCABULARY), "input_shape": [CONTEXT],
        "embed_dim": 32, "depth": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "mlp_dim": 48, "gated": True}
# Lengths that take one bucket, several pieces, and cross a cache chunk.
PROMPTS = ["t", "the king", "what say you, my lord", "o" * 40,
           "now is the winter of our discontent made glorious summer by this "
           "sun of york"]


def assert_same_greedy_tokens(model, engine, completions):
  forward = full_forward(model)
  for done in completions:
    ids = engine.encode(done.request.prompt)
    reference, gaps = recomputed_greedy(forward, ids, len(done.tokens),
                                        CONTEXT)
    for step, (got, want) in enumerate(zip(done.tokens, reference)):
      if got != want:  # only where the two best logits tie
        assert gaps[step] < 1e-4, (done.request.prompt, step, gaps[step])
        break


@pytest.fixture(scope="module")
def model():
  return models.create_model("decoder", ARGS, seed=3)


@pytest.fixture(scope="module")
def engine(model):
  return Engine(model, CONTEXT, slots=8, buckets=(16, 32),
                vocabulary=VOCABULARY)


def test_greedy_tokens_equal_recomputing_the_prefix(model, engine,
                                                   monkeypatch):
  # Ten requests through eight slots, of different lengths: freed slots
  # take the waiting requests, beside others at other positions.
  requests = [generation.Request(p, max_tokens=40 - 3 * i)
              for i, p in enumerate(PROMPTS + [p[::-1] for p in PROMPTS])]
  steps = collections.Counter()
  for name in ("generate", "generate/whole"):
    monkeypatch.setitem(engine.executables, name, functools.partial(
        lambda name, run, *args: steps.update([name]) or run(*args), name,
        engine.executables[name]))
  completions = scheduler.run(engine, requests)
  # Steps read the cache chunk by chunk, then whole past half of it.
  assert steps["generate"] > 0 and steps["generate/whole"] > 0, steps
  assert [len(c.tokens) for c in completions] == [40 - 3 * i
                                                  for i in range(10)]
  assert_same_greedy_tokens(model, engine, completions)
  # Prefill pieces: 77 characters as 32 + 32 + 16 at offsets 0, 32, 64.
  assert [engine.piece(o, 77 - o) for o in (0, 32, 64)] == [32, 32, 16]
  assert set(engine.executables) == {"prefill/16", "prefill/32", "insert",
                                     "generate", "generate/whole",
                                     "zeros/slots", "zeros/prompt"}


def test_a_seed_gives_the_same_text_alone_and_beside_others(engine):
  mine = generation.Request("the king", 30, Sampling(1.0, 0, 0.9, seed=7))
  alone = scheduler.run(engine, [mine])[0]
  others = [generation.Request(p, 20 + i, Sampling(t, k, p_, seed=i))
            for i, (p, t, k, p_) in enumerate([
                ("o", 1.5, 5, 1.0), ("what say", 0.0, 0, 1.0),
                ("now is", 0.7, 0, 0.5), ("the king", 1.0, 0, 0.9),
                ("t", 1.0, 3, 0.8), ("a" * 40, 2.0, 0, 1.0),
                ("my lord", 0.3, 10, 0.95)])]
  beside = scheduler.run(engine, [*others[:3], mine, *others[3:]])
  assert beside[3].tokens == alone.tokens  # beside 7 others in 8 slots
  again = scheduler.run(engine, [
      generation.Request("the king", 30, Sampling(1.0, 0, 0.9, seed=8))])[0]
  assert again.tokens != alone.tokens  # the seed matters
  greedy = scheduler.run(engine, [generation.Request("the king", 30)])[0]
  top1 = scheduler.run(engine, [
      generation.Request("the king", 30, Sampling(2.0, 1, 1.0, seed=5))])[0]
  assert top1.tokens == greedy.tokens  # top_k 1 leaves only the argmax
  nucleus = scheduler.run(engine, [
      generation.Request("the king", 30, Sampling(2.0, 0, 1e-6, seed=5))])[0]
  assert nucleus.tokens == greedy.tokens  # as does a tiny top_p


def test_stop_strings_limits_and_the_streamed_text(engine):
  free = scheduler.run(engine, [generation.Request("the king", 40)])[0]
  stop = free.text[10:13]
  streamed = []
  done = scheduler.run(
      engine, [generation.Request("the king", 40, stop=(stop, "#never#"))],
      on_text=lambda index, text: streamed.append(text))[0]
  assert done.finish_reason == "stop"
  assert done.text == free.text[:free.text.find(stop)]
  assert "".join(streamed) == done.text  # nothing of the stop string leaked
  assert free.finish_reason == "length"
  # A prompt of 120 leaves room for 8 tokens in a context of 128.
  full = scheduler.run(engine, [generation.Request("a" * 120, 50)])[0]
  assert (len(full.tokens), full.finish_reason) == (8, "length")
  assert generation.held_back("the ki", ["king", "xx"]) == 2
  assert generation.held_back("the ki", ["q"]) == 0
  with pytest.raises(InputError, match="not in the vocabulary"):
    scheduler.run(engine, [generation.Request("THE KING")])
  with pytest.raises(InputError, match="a prompt of 128 tokens"):
    scheduler.run(engine, [generation.Request("the"),
                            generation.Request("a" * 128)])


@pytest.mark.slow
def test_int8_weights_decode_through_the_cache():
  model = models.create_model("decoder", ARGS, seed=3)
  served, _ = quantize.ptq(model, [CONTEXT], "w8")
  engine = Engine(served, CONTEXT, slots=2, buckets=(16, 32),
                  vocabulary=VOCABULARY)
  requests = [generation.Request(p, max_tokens=20) for p in PROMPTS[1:3]]
  assert_same_greedy_tokens(served, engine, scheduler.run(engine, requests))


@pytest.mark.slow
def test_an_int8_kv_cache_stores_bytes_and_a_scale_and_scores_alike(
    model, engine):
  int8 = Engine(model, CONTEXT, slots=8, buckets=(16, 32), kv_cache="int8",
                vocabulary=VOCABULARY)
  # A byte per element and a float32 scale per token and head (head_dim 8
  # here: 0.375 of float32; 0.28 at head_dim 32).
  hd = ARGS["head_dim"]
  assert int8.cache_bytes == engine.cache_bytes * (hd + 4) / (4 * hd)
  assert "generate/whole" not in int8.executables  # it stays chunked
  windows = np.random.default_rng(1).integers(
      0, len(VOCABULARY), (8, CONTEXT + 1)).astype(np.int32)
  through_float = loss_through_cache(engine, windows, 16)
  log_probs = jax.nn.log_softmax(np.asarray(model(windows[:, :-1])), -1)
  whole = -np.take_along_axis(np.asarray(log_probs), windows[:, 1:, None],
                              -1).mean() / np.log(2)
  assert through_float == pytest.approx(whole, rel=1e-5)  # the decode path
  through_int8 = loss_through_cache(int8, windows, 16)
  assert through_int8 != through_float
  assert through_int8 == pytest.approx(through_float, rel=0.01)
  done = scheduler.run(int8, [generation.Request("the king", 20)])[0]
  assert len(done.tokens) == 20


@pytest.fixture(scope="module")
def draft():
  """The target's embedding and first block alone (the same seed builds
  them alike): it agrees with the target about half the time."""
  return models.create_model("decoder", {**ARGS, "depth": 1}, seed=3)


def test_speculative_decoding_keeps_the_targets_greedy_text(model, engine,
                                                             draft):
  requests = [generation.Request(p, max_tokens=30) for p in PROMPTS] + [
      generation.Request("a" * 120, 30)]  # rounds that pass the context
  plain = scheduler.run(engine, requests)
  for drafter, k in ((draft, 3), (model, 4)):  # rejections; all accepted
    fast = Engine(model, CONTEXT, slots=4, buckets=(32,),
                  vocabulary=VOCABULARY, draft=drafter, speculate=k)
    done = scheduler.run(fast, requests)
    assert [c.tokens for c in done] == [c.tokens for c in plain]
    assert len(done[-1].tokens) == 8  # the context's end, as without
    assert fast.cache_length == CONTEXT + 64  # room for k past the end
    assert (0 < fast.acceptance < 0.9) if drafter is draft else (
        fast.acceptance == 1.0)
  with pytest.raises(FlagError, match="needs a draft model and speculate"):
    Engine(model, CONTEXT, draft=draft, vocabulary=VOCABULARY)
  other = models.create_model("decoder", {**ARGS, "num_classes": 40})
  with pytest.raises(FlagError, match="vocabulary .40 tokens. is not"):
    Engine(model, CONTEXT, draft=other, speculate=2, vocabulary=VOCABULARY)


def first_two_tokens(engine, prompt, sampling, seeds):
  """Counts of each (first, second) generated token pair over `seeds`."""
  done = scheduler.run(engine, [generation.Request(
      prompt, 2, Sampling(**sampling, seed=s)) for s in seeds])
  pairs = np.array([c.tokens for c in done])
  return np.bincount(pairs[:, 0] * len(VOCABULARY) + pairs[:, 1],
                     minlength=len(VOCABULARY) ** 2)


def chi_square_p(counts, model, prompt, sampling):
  """Chi-square p-value of pair counts against the target's own pair
  probabilities (merging pairs expected fewer than 5 times)."""
  ids = list(tokens.encode(VOCABULARY, prompt))
  vocabulary = len(VOCABULARY)
  batch = np.array([ids + [t] for t in range(vocabulary)], np.int32)
  logits = np.asarray(model(batch))
  arrays = {k: np.full(vocabulary, v) for k, v in sampling.items()}
  probs = lambda rows: np.asarray(jax.nn.softmax(
      sampling_lib.allowed(rows, **arrays), -1))
  expected = (probs(logits[:, -2])[0][:, None] * probs(logits[:, -1])
              ).reshape(-1) * counts.sum()
  big = expected >= 5
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(expected[big], expected[~big].sum())
  return stats.chisquare(observed, expected * observed.sum()
                         / expected.sum()).pvalue


@pytest.mark.slow
def test_speculative_sampling_follows_the_targets_distribution(
    model, draft, monkeypatch):
  prompt, sampling = "the king", {"temperature": 1.0, "top_k": 20,
                                 "top_p": 0.95}
  seeds = range(2000)
  fast = lambda: Engine(model, CONTEXT, slots=40, buckets=(16,),
                        vocabulary=VOCABULARY, draft=draft, speculate=2)
  right = first_two_tokens(fast(), prompt, sampling, seeds)
  assert chi_square_p(right, model, prompt, sampling) > 0.01
  # Accepting every drafted token gives the draft's distribution instead.
  monkeypatch.setattr(speculative, "accepted",
                      lambda drafted, *rest: np.ones(drafted.shape, bool))
  wrong = first_two_tokens(fast(), prompt, sampling, seeds)
  assert chi_square_p(wrong, model, prompt, sampling) < 0.01


@pytest.mark.slow
def test_the_same_tokens_on_two_device_meshes():
  result = run_module("tests.generation_on_mesh", timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  tokens = json.loads(result.stdout.strip().splitlines()[-1])
  assert tokens["data:2"] == tokens["one device"]
  assert tokens["model:2"] == tokens["one device"]


@pytest.fixture(scope="module")
def lm_checkpoint(model, tmp_path_factory):
  from rtjax.checkpoint import save_complete_step
  workdir = tmp_path_factory.mktemp("lm")
  save_complete_step(model, {"model": {"name": "decoder", "args": ARGS},
                             "dataset": {"vocabulary": VOCABULARY}}, workdir)
  return workdir


@pytest.mark.slow
def test_generate_streams_text_and_reports_token_times(lm_checkpoint):
  result = run_module("experiments.generate", f"--checkpoint={lm_checkpoint}",
                      "--prompt=the king", "--max_tokens=12",
                      "--num_samples=2", "--temperature=1.0",
                      f"--draft={lm_checkpoint}", "--speculate=3",
                      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("the king")
  assert "--- sample 1 (seed 1) ---" in result.stdout
  assert "24 tokens in 2 sample(s); TTFT" in result.stdout
  # The model as its own draft: p = q, so every drafted token is kept.
  assert "; 100% of drafted tokens accepted" in result.stdout


def test_generate_refuses_a_character_outside_the_vocabulary(lm_checkpoint):
  result = run_module("experiments.generate", f"--checkpoint={lm_checkpoint}",
                      "--prompt=ROMEO:", timeout=120)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: character 'R' is not in the vocabulary of 30 characters")


def test_the_pytorch_twin_computes_the_decoders_logits(model):
  torch = pytest.importorskip("torch")
  from rtjax.bench import torch_decoder
  twin = torch_decoder.decoder_twin(model)
  tokens = np.random.default_rng(0).integers(0, len(VOCABULARY), (2, 40))
  want = np.asarray(model(tokens.astype(np.int32)))
  with torch.inference_mode():
    cache = twin.empty_cache(2, 41)
    prompt = twin(torch.from_numpy(tokens[:, :39]), 0, cache).numpy()
    last = twin(torch.from_numpy(tokens[:, 39:]), 39, cache).numpy()
  np.testing.assert_allclose(prompt, want[:, :39], atol=1e-4)
  np.testing.assert_allclose(last[:, 0], want[:, 39], atol=1e-4)


@pytest.mark.slow
def test_loadgen_token_latencies_and_static_batches_wait_for_the_longest(
    engine, tmp_path):
  from rtjax.bench import generation_loadgen as glg
  # E[longest of 8] / E[mean] for uniform 16-256: 16 + 240 * 8/9 over 136.
  assert glg.static_bound(16, 256, 8) == pytest.approx(1.686, abs=0.01)
  load = glg.workload(["the king is dead, long live the king"], [8, 16], 2,
                      30, 24)
  ends = {}
  for policy in glg.POLICIES:
    result = glg.run(engine, load, "Offline", policy, tmp_path / policy,
                     min_duration_ms=1, min_query_count=24)
    done = sorted(result["completions"], key=lambda c: c.token_times[0])
    assert len(done) == 24 and result["tokens_per_second"] > 0
    ends[policy] = done
  # Static: a batch of 8 starts after every member of the one before ended.
  static = ends["static"]
  for i in range(8, 24, 8):
    assert min(c.token_times[0] for c in static[i:i + 8]) >= max(
        c.token_times[-1] for c in static[i - 8:i])
  continuous = ends["continuous"]
  assert any(c.token_times[0] < max(d.token_times[-1] for d in continuous[:8])
             for c in continuous[8:])
  served = glg.run(engine, load, "Server", "continuous", tmp_path / "server",
                   target_qps=50, min_duration_ms=300, min_query_count=10)
  assert 0 < served["ttft_p99_ns"] and 0 < served["tpot_p50_ns"]
