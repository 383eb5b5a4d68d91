#!/usr/bin/env bash
# The one GPU check (issue #23 item 4): run it on a lent H100/H200 from the repository root.
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default $OUT, else ./gpu_check_out; < 8 min on one H100
#
# Stages, each timed, its log in OUT_DIR/<stage>.log, a row in OUT_DIR/gpu_check.md:
#   1. cuda_kernels  the CUDA-only kernel tests (bf16/fp8 Triton against the references, no interpreter)
#                    and the fp32 kernel tests on the GPU
#   2. bench_kernels bench/kernels.py at DeepSeek-V3.2 shapes (one JSON line per op, backend, shape)
#   3. vllm_smoke    a tiny sparse DSA model through dsarl's vLLM adapter (generate, score, weight update)
#   4. grpo_ray      `dsarl grpo`, 3 steps, learner and rollout worker on the GPU        (needs Ray)
#   5. grpo_noray    scripts/gpu_grpo_smoke.py: the same pieces in one process, 3 steps (needs only torch)
# A stage whose packages are missing is "skipped" with the missing names, not failed. The device
# machines hold torch and triton but not Ray (a 79 MB wheel, over a run's 64 MiB carry limit) nor vLLM:
# carry the small ones as wheels (../.library/device/README.md) and stages 3-4 run where they can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu_site:${PYTHONPATH:-}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
TABLE="$OUT_DIR/gpu_check.md"

# dsarl itself without its dependencies (nothing can be fetched there), importable as `dsarl`. Editable, as
# here: `python -m pytest` puts the checkout first on sys.path, and its dsarl/__init__.py alone (the
# sub-packages are folders at the root, mapped by package-dir) would hide a plain --target install.
if ! $PY -c "import dsarl.kernels" 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/install.log" 2>&1; then
    export PYTHONSAFEPATH=1  # no editable install: a --target one, and the checkout off sys.path
    $PY -m pip install -q --no-deps --no-build-isolation --target .gpu_site . >>"$OUT_DIR/install.log" 2>&1 \
      || echo "dsarl install failed: see $OUT_DIR/install.log"
  fi
fi

{
  echo "# dsarl GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -1)," \
       "triton: $($PY -c 'import triton; print(triton.__version__)' 2>&1 | tail -1)"
  echo
  echo "| stage | result | seconds | summary |"
  echo "|---|---|---|---|"
} >"$TABLE"

missing() {  # the names among "$@" that python cannot import
  local m=()
  for mod in "$@"; do $PY -c "import $mod" 2>/dev/null || m+=("$mod"); done
  echo "${m[*]:-}"
}

stage() {  # stage NAME TIMEOUT_S "REQUIRED MODULES" COMMAND...
  local name=$1 limit=$2 needs=$3
  shift 3
  local lacking
  lacking=$(missing $needs)
  if [ -n "$lacking" ]; then
    echo "| $name | skipped | 0 | missing: $lacking |" >>"$TABLE"
    return
  fi
  local t0=$SECONDS rc
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  local result=pass
  [ $rc -ne 0 ] && result="FAIL (exit $rc)"
  [ $rc -eq 124 ] && result="TIMEOUT (${limit}s)"
  local summary
  summary=$(grep -E "passed|failed|error" "$OUT_DIR/$name.log" | tail -1 | cut -c1-150)
  [ -z "$summary" ] && summary="$(grep -c '^{' "$OUT_DIR/$name.log") JSON lines"
  echo "| $name | $result | $((SECONDS - t0)) | ${summary//|//} |" >>"$TABLE"
}

stage cuda_kernels 150 "torch triton pytest hypothesis dsarl" \
  $PY -m pytest -q -p no:cacheprovider tests/kernels
stage bench_kernels 150 "torch triton dsarl" $PY bench/kernels.py
stage vllm_smoke 120 "vllm ray dsarl" \
  $PY -m pytest -q -p no:cacheprovider tests/actors/test_vllm_adapter.py
stage grpo_ray 150 "ray omegaconf dsarl math_verify" bash -c '
  set -e
  d=$(mktemp -d)
  '"$PY"' - "$d" <<EOF
import sys
from dsarl.models import DSAConfig, build_model, save_pretrained
save_pretrained(build_model(DSAConfig(hidden_size=256, num_hidden_layers=2, attention="sparse"), seed=0), sys.argv[1] + "/init")
EOF
  '"$PY"' -m dsarl.launch grpo configs/grpo_tiny.yaml init_from=$d/init run_dir=$d/run steps=3 eval_every=0 \
    eval_samples=8 prompts_per_step=8 rollout.num_gpus_per_worker=0.4 learner_num_gpus=0.4
  cat $d/run/metrics.jsonl'
stage grpo_noray 120 "torch dsarl" $PY scripts/gpu_grpo_smoke.py

cat "$TABLE"
for f in "$OUT_DIR"/bench_kernels.log "$OUT_DIR"/grpo_noray.log; do
  [ -f "$f" ] && { echo; echo "## $(basename "$f")"; grep '^{' "$f"; }
done
grep -q "FAIL\|TIMEOUT" "$TABLE" && exit 1
exit 0
