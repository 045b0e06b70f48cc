"""`python -m tests.sharded_inference [--meshes=a,b] [--float_only]
CHECKPOINT...`: on 8 simulated CPU devices (every mesh of MESHES, or those
named), for each checkpoint's float model and its int8 conversion,
the largest |difference| between each mesh's outputs and the same serving
function's outputs on one device.

A separate process because the device count is fixed when JAX starts.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from rtjax.compress import quantize  # noqa: E402
from rtjax.models import quantized  # noqa: E402
from rtjax.infer import CompiledModel, lowering, make_mesh  # noqa: E402
from rtjax.checkpoint import load_checkpoint  # noqa: E402

MESHES = {"data_parallel": {"data": 8}, "tensor_parallel": {"model": 8},
          "data_and_tensor": {"data": 2, "model": 4}}


def main(args):
  options = {a.split("=")[0]: a.partition("=")[2] for a in args
             if a.startswith("--")}
  meshes = ({name: MESHES[name] for name in options["--meshes"].split(",")}
            if "--meshes" in options else MESHES)
  report = {}
  for path in (a for a in args if not a.startswith("--")):
    float_model, metadata = load_checkpoint(path)
    shape = metadata["model"]["args"]["input_shape"]
    kinds = {"float": float_model}
    if "--float_only" not in options:
      kinds["int8"] = quantize.int8_model(
          float_model, quantized.quantization_spec("w8a8", mode="ptq"), shape)
    for kind, model in kinds.items():
      report[f"{path}:{kind}"] = measure(model, shape, meshes)
  print(json.dumps(report))


def measure(model, shape, meshes):
  """Largest |difference| to one device, per mesh, and the collectives used."""
  images = np.random.default_rng(0).normal(size=(24, *shape)).astype(np.float32)
  one_device = make_mesh({"data": 1}, devices=jax.devices()[:1])
  reference = CompiledModel(model, shape, batch_sizes=(8,),
                            mesh=one_device)(images)
  result = {}
  # Float CNNs also data-parallel with every stride-1 2D conv a banded
  # matmul, every other conv a patch matmul, the weights embedded.
  banded = {path: blocks[-1] for path, blocks
            in lowering.candidate_blocks(model, shape).items()}
  variants = {name: (mesh, {}) for name, mesh in meshes.items()}
  if banded:
    variants["banded_embedded"] = ({"data": 8}, {"conv_lowering": banded,
                                                 "embed_weights": True})
  for name, (mesh, serving) in variants.items():
    served = CompiledModel(model, shape, batch_sizes=(8,),
                           mesh=make_mesh(mesh), **serving)
    outputs = served(images)
    hlo = served.executables[8].as_text()
    result[name] = {
        "max_abs_diff": float(np.max(np.abs(outputs - reference))),
        "same_top1": bool(np.all(outputs.argmax(-1) == reference.argmax(-1))),
        "shape": list(outputs.shape),
        "collectives": sum(hlo.count(op) for op in (
            "all-reduce", "all-gather", "reduce-scatter", "all-to-all")),
    }
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
