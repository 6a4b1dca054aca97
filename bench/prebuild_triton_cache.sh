#!/usr/bin/env bash
# Builds bench/.gpu-carry/triton-cache.tar.xz, the sm_90 Triton cache that bench/gpu_run.sh unpacks on the GPU
# machine so that its phases find the family's kernels compiled (no GPU needed here; ~6 min on 2 cores, 3-4 MiB).
#
# Triton's cache key hashes triton's own library, which differs per Python version, so this compiles with the GPU
# image's Python (3.12) and triton (3.6.0), in a venv of its own (torch 2.11.0 is only for CPU tensors; the first run
# downloads it, ~3 GB). Kernels are compiled through their launchers by tests/sm90_compile.py --set family (the 11
# models' shapes at batch 1 and 256, every dtype, every autotune config the pruners keep, the block GEMMs), into the
# path the GPU side unpacks to: Triton's group index names its files by absolute path.
#
#   bash bench/prebuild_triton_cache.sh          then name bench/.gpu-carry in the device call's `carry`
#
# Settings (environment): CVF_BENCH_PYTHON312 (default python3.12), CVF_BENCH_PY312_VENV (default
# /tmp/crossvit_fast-py312), CVF_BENCH_JOBS (compile processes, default 2).
#
# Rebuild after any kernel change (a changed kernel simply misses: it compiles on the GPU as without the cache).
# Each gpu_run.sh phase logs how many kernels it found and how many it compiled; all compiled, none found = the
# key does not match (another triton build on the GPU image).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${CVF_BENCH_PYTHON312:-python3.12}
venv=${CVF_BENCH_PY312_VENV:-/tmp/crossvit_fast-py312}
cache=/tmp/crossvit_fast-triton-cache  # must equal gpu_run.sh's tcache
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy<2.4"
fi
"$venv/bin/python" -c "import triton, sys; assert triton.__version__ == '3.6.0' and sys.version_info[:2] == (3, 12), \
  (triton.__version__, sys.version)"
rm -rf "$cache"
"$venv/bin/python" tests/sm90_compile.py --set family --jobs "${CVF_BENCH_JOBS:-2}" --cache-dir "$cache" \
  --pack bench/.gpu-carry/triton-cache.tar.xz "$@"
