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
start=$(date +%s)
# pip's own output is shown (each package it collects, downloads and installs; download bars in
# a terminal): the whole install takes minutes and must not look hung.
PIP_OPTS=(--progress-bar on)

say() { echo "setup [$(( $(date +%s) - start )) s]: $*"; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
say "installing $TORCH_PIN (the CPU wheel) into .venv"
.venv/bin/pip install "${PIP_OPTS[@]}" "$TORCH_PIN"
say "installing merge-evolve (editable) with its dependencies and test extras into .venv (~2 min)"
.venv/bin/pip install "${PIP_OPTS[@]}" -e ".[test]"
.venv/bin/python scripts/missing_deps.py merge-evolve

if [ "${1:-}" = "--with-mergekit" ] && [ ! -x .venv-mergekit/bin/mergekit-yaml ]; then
  say "building .venv-mergekit: $TORCH_PIN, then mergekit==0.1.5 (the differential tests' oracle, ~2 min)"
  "$PY" -m venv .venv-mergekit
  .venv-mergekit/bin/pip install "${PIP_OPTS[@]}" "$TORCH_PIN"
  .venv-mergekit/bin/pip install "${PIP_OPTS[@]}" "mergekit==0.1.5"
fi
say "done"
