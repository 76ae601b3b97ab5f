#!/usr/bin/env bash
# GPU readiness check for a maintainer with one GPU (issue 19): about 5 minutes, installs nothing,
# touches no network. Prints one PASS / FAIL / SKIP line per check and exits 1 on any FAIL.
#
#   bash scripts/gpu_check.sh                 # from a checkout; torch with CUDA must be importable
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --self-test     # no GPU: the same checks with the CPU as "the GPU"
#
# Checks (details: scripts/gpu_check.py):
#   env    the CUDA device; which optional packages are importable
#   merge  every merge method merged on the GPU (in memory resident, in memory streamed,
#          merge-yaml --device cuda) against merge-yaml on the CPU: <= 1 bf16 ulp   [pydantic]
#   hf     the HF evaluator on the GPU gives the CPU's scores (float32)             [lm-eval]
#   vllm   the vLLM evaluator's scores equal the HF evaluator's after pushes into a running
#          engine with CUDA graphs on                                              [vllm, lm-eval]
#   bench  scripts/bench_vllm.py --device cuda numbers                             [vllm, lm-eval]
# A check whose packages are missing is SKIPped, saying which. Needs: torch (CUDA), numpy,
# safetensors, pyyaml, transformers (+ tokenizers); merge_core imports pydantic.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-$(mktemp -d)}" WANDB_MODE=disabled RAY_AUTH_MODE=disabled
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LIMIT="${CHECK_TIMEOUT:-420}"  # seconds per group; all groups together stay under 10 minutes

fails=0
for group in env merge hf vllm bench; do
  timeout "$LIMIT" "$PYTHON" scripts/gpu_check.py "$group" --workdir "$WORK" "$@" 2>"$WORK/$group.err" \
    | tee "$WORK/$group.out"
  rc=${PIPESTATUS[0]}
  fails=$((fails + $(grep -c '^FAIL ' "$WORK/$group.out" || true)))
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then  # crashed or timed out: one more FAIL line
    why=$([ "$rc" -eq 124 ] && echo "timed out after $LIMIT s" || echo "exit $rc")
    echo "FAIL $group: $why; last lines of its stderr:"
    tail -n 15 "$WORK/$group.err" | sed 's/^/  /'
    fails=$((fails + 1))
  elif ! grep -qE '^(PASS|FAIL|SKIP) ' "$WORK/$group.out"; then
    echo "FAIL $group: printed no result"
    fails=$((fails + 1))
  elif [ "$rc" -eq 1 ]; then  # its FAIL lines are above; the why is on its stderr
    tail -n 15 "$WORK/$group.err" | sed 's/^/  /'
  fi
done
passes=$(cat "$WORK"/*.out | grep -c '^PASS ' || true)
skips=$(cat "$WORK"/*.out | grep -c '^SKIP ' || true)
echo "gpu_check: $passes passed, $fails failed, $skips skipped$([ "$fails" -ne 0 ] && echo ' -- FAILED')"
[ "$fails" -eq 0 ]
