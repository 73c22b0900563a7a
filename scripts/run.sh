#!/usr/bin/env bash
# Sets everything up and runs qpeft's main job on the default model.
# Extra arguments go to `qpeft quantize` (see `qpeft quantize --help`).
set -euo pipefail
source "$(dirname "$0")/setup.sh" "hf"
qpeft quantize --out runs/quantized-smollm2 "$@"
