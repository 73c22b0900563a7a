#!/usr/bin/env bash
# Sets everything up and runs qpeft's main job: the default `qpeft train`
# (QLoRA on SmolLM2-135M-Instruct with a generated instruction set; held-out
# exact-match accuracy before and after; everything saved under runs/default).
# Extra arguments go to `qpeft train` (see `qpeft train --help`).
set -euo pipefail
source "$(dirname "$0")/setup.sh" "hf"
qpeft train "$@"
