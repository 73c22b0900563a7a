#!/usr/bin/env bash
# Sets up .venv with qpeft and its test oracles, then runs the Rust unit tests
# and the Python test suite (slow tests included; GPU tests skip without a GPU).
set -euo pipefail
source "$(dirname "$0")/setup.sh" "dev,hf"
cargo test --release --quiet
python -m pytest -q -p no:cacheprovider "$@"
