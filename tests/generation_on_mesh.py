"""`python -m tests.generation_on_mesh`: on 2 simulated CPU devices, the
greedy tokens of test_generation's model and prompts from an engine on one
device, on `data:2` (slots split) and on `model:2` (key/value heads and the
weights split): one line of JSON, {mesh: tokens per prompt}.

A separate process because the device count is fixed when JAX starts.
"""

import json

import jax

jax.config.update("jax_num_cpu_devices", 2)

from rtjax import models  # noqa: E402
from rtjax.infer import generation, make_mesh, scheduler  # noqa: E402
from rtjax.infer.engine import Engine  # noqa: E402
from tests.test_generation import (ARGS, CONTEXT, PROMPTS,  # noqa: E402
                                   VOCABULARY)


def main():
  model = models.create_model("decoder", ARGS, seed=3)
  meshes = {"one device": make_mesh({"data": 1}, jax.devices()[:1]),
            "data:2": make_mesh({"data": 2}), "model:2": make_mesh({"model": 2})}
  requests = [generation.Request(p, max_tokens=40) for p in PROMPTS]
  tokens = {}
  for name, mesh in meshes.items():
    engine = Engine(model, CONTEXT, slots=2, buckets=(16, 32), mesh=mesh,
                    vocabulary=VOCABULARY)
    tokens[name] = [c.tokens for c in scheduler.run(engine, requests)]
  print(json.dumps(tokens))


if __name__ == "__main__":
  main()
