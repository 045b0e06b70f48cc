"""Streaming inference: a recurrent model or a causal Transformer fed step
by step (or in chunks) gives, after the last step, the whole-sequence
forward's logits, and after step t those of the first t + 1 steps."""

import numpy as np
import pytest

from rtjax import models
from rtjax.bench.latency import streaming_latency
from rtjax.errors import FlagError, InputError
from rtjax.infer.streaming import StreamingModel

SHAPE = (40, 1)


def recurrent(name, **args):
  return models.create_model(name, {"num_classes": 10, "input_shape": list(SHAPE),
                                    "hidden": [16, 8], "bidirectional": False,
                                    "head": "last", **args}, seed=1)


def causal_transformer(**args):
  return models.create_model("transformer1d", {
      "num_classes": 10, "input_shape": list(SHAPE), "embed_dim": 16,
      "depth": 2, "num_heads": 2, "head_dim": 8, "mlp_dim": 16,
      "causal": True, **args}, seed=1)


@pytest.mark.parametrize("name,chunk", [("gru", 1), ("lstm", 8),
                                        ("transformer1d", 4)])
def test_stream_ends_on_the_full_forward(name, chunk):
  model = causal_transformer() if name == "transformer1d" else recurrent(name)
  x = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)
  full = np.asarray(models.inference_view(model)(x))
  stream = StreamingModel(model, SHAPE, batch=2, chunk=chunk)
  for signal in range(2):  # reset() starts a new signal from scratch
    outs = [stream(x[:, t:t + chunk]) for t in range(0, 40, chunk)]
    np.testing.assert_allclose(outs[-1][:, -1], full, atol=1e-5, rtol=0)
    # After step t the prediction is that of the first t + 1 steps alone.
    prefix = np.asarray(models.inference_view(model)(x[:, :24]))
    np.testing.assert_allclose(np.concatenate(outs, 1)[:, 23], prefix,
                               atol=1e-5, rtol=0)
    stream.reset()


def test_stream_refuses_what_it_cannot_serve():
  with pytest.raises(FlagError, match="bidirectional"):
    StreamingModel(recurrent("gru", bidirectional=True), SHAPE)
  with pytest.raises(FlagError, match="every step"):
    StreamingModel(recurrent("gru", head="all"), SHAPE)
  cnn = models.create_model("cnn1d", {"num_classes": 10,
                                      "input_shape": list(SHAPE)})
  with pytest.raises(FlagError, match="no state to carry"):
    StreamingModel(cnn, SHAPE)
  with pytest.raises(FlagError, match="causal=True"):
    StreamingModel(causal_transformer(causal=False), SHAPE)
  with pytest.raises(FlagError, match="patch_size=1"):
    StreamingModel(causal_transformer(patch_size=8), SHAPE)
  stream = StreamingModel(recurrent("gru"), SHAPE, chunk=4)
  with pytest.raises(InputError, match=r"compiled for \(1, 4, 1\)"):
    stream(np.zeros((1, 1, 1), np.float32))


@pytest.mark.slow
def test_streaming_latency_reports_per_step_figures():
  stream = StreamingModel(recurrent("gru"), SHAPE, chunk=4)
  result = streaming_latency(stream, iters=20, warmup=2)
  assert 0 < result["device_step_p50_ms"] and (
      result["step_p50_ms"] <= result["step_p99_ms"])
  assert result["chunk"] == 4 and result["batch"] == 1
