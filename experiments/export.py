"""Exports a checkpoint's serving function as a standalone artifact.

  python -m experiments.export --checkpoint=workdirs/default --format=jax_export \
      --out=workdirs/default/export/model.jax

  python -m experiments.export --checkpoint=workdirs/lenet5 --format=onnx \
      --out=workdirs/lenet5/export/model.onnx     # needs pip install 'rtjax[onnx]'

The jax_export artifact (StableHLO with the weights inside, batch dimension
symbolic) runs in any process with jax:
  jax.export.deserialize(bytearray(open(path, 'rb').read())).call(images)
"""

from absl import flags

from experiments import cli
from rtjax.checkpoint import load_checkpoint
from rtjax.infer.export import export_onnx, export_serving

_CHECKPOINT = cli.define_checkpoint()
_FORMAT = flags.DEFINE_enum("format", "jax_export", ["jax_export", "onnx"],
                            "jax_export: StableHLO with weights, any model; "
                            "onnx: float models, needs rtjax[onnx].")
_OUT = flags.DEFINE_string("out", None, "Artifact path.", required=True)


def main(argv):
  del argv
  cli.quiet_orbax()
  model, metadata = load_checkpoint(_CHECKPOINT.value)
  shape = metadata["model"]["args"]["input_shape"]
  if _FORMAT.value == "onnx":
    print(f"wrote {export_onnx(model, shape, _OUT.value, metadata)}", flush=True)
    return
  path = export_serving(model, shape, _OUT.value, metadata)
  print(f"wrote {path} and {path}.json", flush=True)


if __name__ == "__main__":
  cli.run(main)
