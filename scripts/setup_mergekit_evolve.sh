#!/usr/bin/env bash
# Add mergekit-evolve's runtime dependencies (mergekit 0.1.5's "evolve" extra: lm-eval, ray, cma,
# wandb; plus accelerate, which lm-eval's HF backend needs) into .venv-mergekit, for the benchmark
# that runs the OLD tool through scripts/mergekit_evolve_cpu.py. Idempotent: does nothing when the
# packages already import. torch is pinned on the command line so pip never replaces the CPU build.
# Never installs vllm (GPU-only wheel). Usage: bash scripts/setup_mergekit_evolve.sh
# Measured here (2 cores, PyPI only): ~1-2 min on a venv that already has mergekit 0.1.5.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
PY="${PYTHON:-python3}"
VENV=.venv-mergekit

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -x "$VENV/bin/mergekit-evolve" ]; then
  "$VENV/bin/pip" install -q "$TORCH_PIN" "mergekit==0.1.5"
fi

if "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
import cma, ray, lm_eval, wandb, accelerate  # noqa: F401
v = tuple(int(x) for x in md.version("lm_eval").split(".")[:3])
sys.exit(0 if v >= (0, 4, 9) else 1)  # custom_dataset in task YAMLs needs a recent lm-eval
EOF
then
  echo "mergekit-evolve deps already present in $VENV"
  exit 0
fi

start=$(date +%s)
"$VENV/bin/pip" install -q "$TORCH_PIN" "mergekit==0.1.5" \
  "lm_eval>=0.4.9" ray cma wandb accelerate
echo "installed mergekit-evolve deps into $VENV in $(( $(date +%s) - start )) s"
