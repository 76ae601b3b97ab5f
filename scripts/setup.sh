#!/usr/bin/env bash
# Create .venv with merge-evolve installed (editable, with test extras).
# torch is pinned and installed FIRST: an unpinned torch would pull a multi-GB CUDA build.
# Usage: bash scripts/setup.sh [--with-mergekit]
#   --with-mergekit also builds .venv-mergekit with mergekit 0.1.5, the test-only oracle that the
#   differential tests run as a subprocess (the product never imports mergekit).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q "$TORCH_PIN"
.venv/bin/pip install -q -e ".[test]"

if [ "${1:-}" = "--with-mergekit" ] && [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  "$PY" -m venv .venv-mergekit
  .venv-mergekit/bin/pip install -q "$TORCH_PIN"
  .venv-mergekit/bin/pip install -q "mergekit==0.1.5"
fi
