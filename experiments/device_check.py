r"""The accelerator check in one table: train the tiny CNN, serve the CNN,
LeNet-5 and the ViT at batch 1 and 256 in f32, bf16 and int8, time the peers
available on the machine. Meant for a short lease (<= 4 min) on a GPU or TPU
that has jax, flax, optax and orbax; run it through its shell script, which
installs what else rtjax needs from wheels placed beside it:

  bash experiments/device_check.sh                         # jax's default device
  bash experiments/device_check.sh --platform=cpu --tiny   # a short CPU run

tests/test_device_check.py runs the tiny CPU mode (in process, on the tests'
trained checkpoint) and the script itself.

Exit code 0: every check passed; 1: a served dtype or a peer disagreed with
f32 (the table is still printed); 2: a bad flag.
"""

import sys
import tempfile

import jax
from absl import flags

from configs import default, lenet5, vit
from experiments import cli
from rtjax.bench import device_check, provenance

_PLATFORM = flags.DEFINE_enum("platform", "", ["", "cpu", "gpu", "tpu"],
                              "Run on this platform ('': jax's default).")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny models, few steps and calls, "
                          "batch 2 only: a short run for the tests.")
_BATCH_SIZES = cli.define_batch_sizes(["1", "256"])
_ITERS = flags.DEFINE_integer("iters", 100, "Timed calls per contender.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the tiny run's "
                               "checkpoints go (default: a temporary dir).")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time "
                                   "torch.compile where torch is installed.")
_BUDGET = flags.DEFINE_float("budget_s", 150.0, "Past this many seconds, skip "
                             "the remaining torch.compile runs.")
_CHECKPOINT = flags.DEFINE_string("cnn_checkpoint", "", "Serve this trained "
                                  "CNN checkpoint instead of training one.")
_RESULTS = flags.DEFINE_string("results", "", "Also write the table, stamped, "
                               "to this markdown file.")


def families(tiny: bool, cnn_checkpoint: str = "") -> list[device_check.Family]:
  """The default CNN's tiny config (trained, unless a checkpoint is given),
  LeNet-5 and the ViT; --tiny shrinks them and the training to seconds."""
  cnn, lenet, transformer = (default.get_config("tiny"), lenet5.get_config(),
                             vit.get_config())
  if tiny:
    cnn.train.num_steps, cnn.train.warmup_steps = 4, 1
    cnn.train.eval_every = cnn.checkpoint.every_steps = 4
    lenet.model.args.conv_channels, lenet.model.args.hidden = (4, 8), (16, 16)
    transformer.model.args.update(embed_dim=16, depth=1, num_heads=2,
                                  head_dim=8, mlp_dim=16)
  return [device_check.Family("cnn (default, tiny config, trained)", cnn, True,
                              cnn_checkpoint or None),
          device_check.Family("lenet5 (initialized)", lenet, False),
          device_check.Family("vit (initialized)", transformer, False)]


def main(argv):
  del argv
  if _PLATFORM.value:
    jax.config.update("jax_platforms", _PLATFORM.value)
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  cli.quiet_orbax()
  batches = [2] if _TINY.value else cli.batch_sizes(_BATCH_SIZES)
  iters = 5 if _TINY.value else _ITERS.value
  with tempfile.TemporaryDirectory() as tmp:
    report = device_check.run(
        families(_TINY.value, _CHECKPOINT.value), _WORKDIR.value or tmp, batches, iters,
        warmup=2 if _TINY.value else 10,
        torch_compile=_TORCH_COMPILE.value and not _TINY.value,
        budget_s=_BUDGET.value)
  text = (f"Device check on {report['device']} (PyTorch peers on "
          f"{report['torch_device']}), {report['seconds']:.0f} s:\n\n"
          + device_check.table(report["rows"])
          + "".join(f"\n- {note}" for note in report["notes"])
          + "".join(f"\n- FAILED: {f}" for f in report["failures"]) + "\n")
  print("\n" + text, flush=True)
  if _RESULTS.value:
    provenance.write_results(_RESULTS.value, text)
  if report["failures"]:
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
