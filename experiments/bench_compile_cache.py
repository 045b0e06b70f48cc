"""What the persistent compilation cache saves: the same serving job started
twice in fresh processes sharing an empty cache directory.

  python -m experiments.bench_compile_cache --checkpoint=workdirs/default
"""

import json
import subprocess
import sys
import tempfile

from absl import flags

from experiments import cli

_CHECKPOINT = cli.define_checkpoint()
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1,8,64,256", "Buckets.")


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
    runs = []
    for _ in range(2):
      subprocess.run(
          [sys.executable, "-m", "experiments.predict",
           f"--checkpoint={_CHECKPOINT.value}", f"--output={out}",
           f"--compilation_cache_dir={cache}",
           f"--batch_sizes={_BATCH_SIZES.value}"],
          check=True, capture_output=True)
      with open(f"{out}/results.json") as f:
        runs.append(json.load(f))
  first, second = (sum(r["compile_seconds"].values()) for r in runs)
  print(f"compile seconds for buckets {_BATCH_SIZES.value}: first process "
        f"{first:.3f} (cache {runs[0]['compilation_cache']}), second process "
        f"{second:.3f} (cache {runs[1]['compilation_cache']}); "
        f"ratio {first / second:.2f}x")


if __name__ == "__main__":
  cli.run(main)
