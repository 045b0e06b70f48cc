r"""Serve checkpoints over the Open Inference Protocol (KServe v2; what Triton,
KServe and MLServer speak) on HTTP, each behind a deadline-aware batcher.

  python -m experiments.serve --checkpoint=workdirs/lenet5 --port=8000 \
      --conv_lowering=auto --embed_weights
  curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{http_code}\n'
  curl -s localhost:8000/v2/models/lenet5         # inputs, outputs, shapes
  curl -s localhost:8000/metrics                  # Prometheus

A decoder language model's checkpoint generates text instead (Triton's
generate extension and OpenAI's completions, over continuous batching):

  python -m experiments.serve --checkpoint=workdirs/lm/target --port=8000
  curl -s localhost:8000/v1/completions -d '{"model": "target",
      "prompt": "ROMEO:", "max_tokens": 64, "stream": true}'
  curl -s localhost:8000/v2/models/target/generate -d '{"text_input": "ROMEO:"}'

A model is named after its run's directory (workdirs/lenet5 -> lenet5)
unless --model_names says otherwise. The server listens at once; readiness
turns 200 when every bucket of every model is compiled and warmed. SIGTERM
stops accepting, answers what is in flight and exits 0. Needs rtjax[serve].
"""

import functools
import re

from absl import flags

from experiments import cli
from rtjax.checkpoint import run_name
from rtjax.errors import FlagError
from rtjax.serve import ModelServer, from_checkpoint, serve

_CHECKPOINTS = flags.DEFINE_list("checkpoint", None, "Checkpoints to serve "
                                 "(workdir, checkpoints/ or a step), comma "
                                 "separated.", required=True)
_NAMES = flags.DEFINE_list("model_names", [], "A name per checkpoint; default: "
                           "each run's directory name.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; "
                            "0.0.0.0 opens the server to other machines.")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_BATCH_SIZES = cli.define_batch_sizes(
    ["1", "2", "4", "8", "16", "32"], "Compiled batch buckets; the largest "
    "is the most rows one request may carry.")
_DEADLINE = flags.DEFINE_float("deadline_ms", 100.0, "Default deadline of a "
                               "request (its parameters.timeout or "
                               "X-Deadline-Ms header overrides it); one that "
                               "cannot be met is answered 429 at once.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue_rows", 1024, "Rows that may wait"
                                  " per model; more are answered 429.")
_MAX_BODY = flags.DEFINE_integer("max_body_mb", 64, "Largest request body "
                                 "(413 above it).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Language models: requests decoded "
                              "side by side.", lower_bound=1)
_PREFILLS = flags.DEFINE_integer("prefills_per_step", 1, "Language models: "
                                 "prompts prefilled at most between two "
                                 "generate steps while others stream (bounds "
                                 "their time per token).", lower_bound=1)
_MAX_QUEUE_REQUESTS = flags.DEFINE_integer(
    "max_queue_requests", 256, "Language models: requests that may wait for "
    "a slot; more are answered 429.", lower_bound=1)
_KV_CACHE = flags.DEFINE_enum("kv_cache", None, ["float", "int8"], "Language "
                              "models: how the KV cache stores keys and "
                              "values. Default: the checkpoint's choice for "
                              "this kind of device, else float.")
_SERVING = cli.ServingFlags()


def main(argv):
  del argv
  serving = _SERVING.setup()
  batch_sizes = cli.batch_sizes(_BATCH_SIZES)
  if not 0 < _PORT.value < 65536:
    raise FlagError(f"--port={_PORT.value}: give a TCP port, 1 to 65535")
  if not _DEADLINE.value > 0:
    raise FlagError(f"--deadline_ms={_DEADLINE.value}: give a positive time")
  if _MAX_QUEUE.value < max(batch_sizes):
    raise FlagError(f"--max_queue_rows={_MAX_QUEUE.value}: at least the "
                    f"largest batch size ({max(batch_sizes)})")
  if _MAX_BODY.value < 1:
    raise FlagError(f"--max_body_mb={_MAX_BODY.value}: give a positive size")
  runs = [run_name(path) for path in _CHECKPOINTS.value]
  names = _NAMES.value or runs
  if len(names) != len(_CHECKPOINTS.value) or len(set(names)) != len(names):
    raise FlagError(f"--model_names={','.join(names)}: give one distinct name "
                    f"per checkpoint ({len(_CHECKPOINTS.value)})")
  bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
  if bad:
    raise FlagError(f"model name(s) {', '.join(bad)}: use letters, digits, "
                    "'_', '.' and '-' (they go into URLs); set --model_names")
  server = ModelServer(
      {name: functools.partial(from_checkpoint, path, name, batch_sizes,
                               slots=_SLOTS.value, kv_cache=_KV_CACHE.value,
                               **serving)
       for name, path in zip(names, _CHECKPOINTS.value)},
      deadline_ms=_DEADLINE.value, max_queue_rows=_MAX_QUEUE.value,
      max_body_bytes=_MAX_BODY.value << 20,
      prefills_per_step=_PREFILLS.value,
      max_queue_requests=_MAX_QUEUE_REQUESTS.value)
  print(f"serving {', '.join(names)} at http://{_HOST.value}:{_PORT.value}/v2"
        " (ready once compiled: /v2/health/ready)", flush=True)
  serve(server, _HOST.value, _PORT.value)


if __name__ == "__main__":
  cli.run(main)
