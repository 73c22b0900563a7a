#!/usr/bin/env bash
# Sets up .venv with qpeft and its test oracles, then runs the Rust unit tests
# (x86-64, and aarch64/NEON under qemu where it can be installed) and the
# Python test suite (slow tests included; GPU tests skip without a GPU).
set -euo pipefail
source "$(dirname "$0")/setup.sh" "dev,hf"
cargo test --release --quiet
bash scripts/test_aarch64.sh
python -m pytest -q -p no:cacheprovider "$@"
