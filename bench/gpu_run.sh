#!/usr/bin/env bash
# One device call per phase (each must end inside the device tool's 10-minute limit):
#   bash bench/gpu_run.sh env|kernels|models|bench-ops|bench-layer-norm|bench-model
# Runs from the repository root of the device's copy; records land in bench/results/ and, when the device tool's
# $OUT is set, are copied there to be fetched and committed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
phase=${1:-env}
out=${OUT:-}
log() { if [ -n "$out" ]; then tee -a "$out/$phase.log"; else cat; fi; }
case "$phase" in
  env)
    { nvidia-smi; python -m crossvit_fast info; } 2>&1 | log ;;
  kernels)
    python -m pytest -q -x tests/test_cls_cross_attention.py tests/test_self_attention.py tests/test_layer_norm.py \
      2>&1 | log ;;
  models)
    python -m pytest -q -x tests/test_model_backends.py tests/test_timm_parity.py tests/test_convert.py \
      tests/test_models.py tests/test_cli.py 2>&1 | log ;;
  bench-ops)
    python bench/bench_cls_cross_attention.py --no-plot 2>&1 | log
    python bench/bench_self_attention.py --no-plot --batch 64 256 --dtype bfloat16 2>&1 | log ;;
  bench-layer-norm)
    python bench/bench_layer_norm.py --batch 256 --dtype bfloat16 float32 2>&1 | log ;;
  bench-model)
    python bench/bench_model.py --profile --no-plot 2>&1 | log ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
status=${PIPESTATUS[0]}
if [ -n "$out" ]; then cp -r bench/results "$out/" 2>/dev/null || true; fi
exit "$status"
