#!/usr/bin/env bash
# The accelerator check (experiments/device_check.py), run from the source
# tree on a machine that has jax, flax, optax and orbax but no network and
# no rtjax install. What else rtjax imports comes from wheels placed in
# experiments/wheels/ (or $RTJAX_WHEELS), installed with pip --no-index only
# when the module is missing. Prepare them on a machine with a network, for
# the accelerator's Python (here 3.12):
#   pip download --only-binary=:all: --python-version 3.12 -d experiments/wheels \
#       qwix ml-collections mlcommons-loadgen scikit-learn etils tensorboardX \
#       mnist1d jax2onnx onnx onnxruntime
# Usage: bash experiments/device_check.sh [--platform=cpu --tiny] [flags]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
wheels="${RTJAX_WHEELS:-$here/wheels}"

# module to import : package that provides it
needed="qwix:qwix ml_collections:ml-collections mlperf_loadgen:mlcommons-loadgen
sklearn:scikit-learn etils:etils tensorboardX:tensorboardX mnist1d:mnist1d
matplotlib:matplotlib tqdm:tqdm"
missing=()
for pair in $needed; do
  "$python" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  if [[ ! -d "$wheels" ]]; then
    echo "error: missing ${missing[*]} and no wheels in $wheels" >&2
    exit 2
  fi
  "$python" -m pip install --quiet --no-index --find-links "$wheels" "${missing[@]}"
fi
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m experiments.device_check "$@"
