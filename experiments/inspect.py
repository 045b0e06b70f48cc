"""Prints what a checkpoint knows about itself: lineage, metrics, versions
and the serving options it records.

  python -m experiments.inspect workdirs/compress/int8
  python -m experiments.inspect workdirs/default --json
"""

import json

from absl import flags

from experiments import cli
from rtjax.checkpoint import describe

_JSON = flags.DEFINE_bool("json", False, "Print the whole metadata as JSON.")


def main(argv):
  if len(argv) != 2:
    raise cli.FlagError("give one checkpoint path: python -m "
                        "experiments.inspect CHECKPOINT")
  cli.quiet_orbax()
  summary = describe(argv[1])
  print(json.dumps(summary, indent=1) if _JSON.value
        else "\n".join(f"{key}: {value}" for key, value in summary.items()))


if __name__ == "__main__":
  cli.run(main)
