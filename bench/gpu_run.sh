#!/usr/bin/env bash
# The GPU runs, one device call per phase. Every phase ends inside its own budget (CVF_BENCH_PHASE_BUDGET, default
# 480 s, so 8 minutes of the device tool's 10-minute command limit): each step gets what is left, a step that runs out
# is interrupted (pytest still writes its report), and the phase always packs what it made.
#
#   bash bench/gpu_run.sh smoke                   first call on a cold GPU: env, the smoke tests, check, headline benches
#   bash bench/gpu_run.sh tests-ops               every CUDA test of the four kernel files (four processes at once)
#   bash bench/gpu_run.sh tests-models            whole models: backends, timm parity, conversion, CLI, training
#   bash bench/gpu_run.sh bench-cls|bench-sa|bench-ln   the op benchmarks at batch 256 (bf16 first)
#   bash bench/gpu_run.sh bench-linear [MODEL]    the fused GEMMs and blocks (default crossvit_18_dagger_240)
#   bash bench/gpu_run.sh bench-model [MODEL [DTYPE [PASS...]]]   the model benchmark, every provider (default
#                                                 crossvit_18_dagger_240 bfloat16 forward train_step)
#   bash bench/gpu_run.sh bench-models            the rest of the model record in one call: crossvit_9_240 and
#                                                 crossvit_18_dagger_408 (bf16 and fp32) and the headline in fp32,
#                                                 forward and train step, eager providers (timm, crossvit_fast,
#                                                 reference: no Inductor compile)
#   bash bench/gpu_run.sh profile                 time by kernel kind: timm eager, timm compiled, crossvit_fast
#   bash bench/gpu_run.sh graphs                  CUDA-graph parity tests; batch-1 and batch-8 latency
#   CVF_BENCH_DRY=1 bash bench/gpu_run.sh PHASE    no GPU: collect the tests and list the bench cases (tests/test_bench.py)
#
# Settings (environment): CVF_BENCH_DRY, CVF_BENCH_PHASE_BUDGET, CVF_BENCH_PRECOMPILE and CVF_BENCH_PRECOMPILE_S (see
# precompile below); the older names GPU_RUN_DRY, PHASE_BUDGET, PRECOMPILE and PRECOMPILE_S are read where these are
# unset. OUT is the device tool's; TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR are Triton's and Inductor's.
#
# With 15 minutes of device time (the budget now, machine starts and idle time included; a machine stays warm 30 s
# after a call): build the prebuilt cache here first (below), then call 1 `smoke` (timeout_s 540), then at once,
# while the machine is warm, call 2 `tests-ops` with CVF_BENCH_PHASE_BUDGET set to what `status` says is left minus
# 90 s (its verified_ops.py line is what item 3 of the bring-up needs); the other phases are for later sessions, in
# the order above. Read each call's output before the next; commit every record as it comes back.
#
# Where things go: with the device tool's $OUT set, records are written into $OUT/results/ as each case finishes (a
# phase cut off still returns its partial records), logs and pytest's junit XML into $OUT; at the end everything is
# packed into one $OUT/<phase>.tgz (the tool returns at most 8 files). Without $OUT, records go to bench/results/.
# Unpack the tar here and copy results/*.json into bench/results/ to commit them. The device's copy of the tree has
# no .git: pass the commit in, `CROSSVIT_FAST_COMMIT=<hash>` written out in the command. bench/report.py merges the
# records of a device's newest commit only, so pass the last commit that changed the code (`git log -1
# --format=%h -- crossvit_fast kernels bench`), not one that only added records: every call of one code version
# then lands in one table.
#
# Triton compiles, counted without a GPU by `python tests/sm90_compile.py --set smoke|ci` (triton 3.6.0, the GPU
# machines' version; CPU seconds of cold compiles on this project's 2-core machines, ptxas included):
#   smoke scope   100 distinct compiles, 87 CPU s (the three ops at the headline shapes, bf16 and fp32, fwd + bwd);
#                 the smoke tests add fp16 (about 50 more) and the linear GEMMs (4 flag sets x 2 widths, bf16)
#   ci scope      469 distinct compiles, 540 CPU s with triton 3.9 (every kernel x dtype x width class, the GEMMs'
#                 8 autotuned tiles each)
#   family scope  765 distinct compiles, 740 CPU s with triton 3.6.0 / Python 3.12 (every op, width, dtype and
#                 autotune candidate of the family: what precompile builds on all cores, and the prebuilt cache holds)
#   tests-ops     the family plus the tests' odd shapes, split over four processes
# Inductor compiles: smoke 1 (timm model, forward; the op benches' compiled providers wait for their phases); bench-ln 24 a dtype; bench-cls 12; bench-linear 20; bench-model 1 per compiled provider and pass
# (~1-2 min each for crossvit_18).
#
# Prebuilt Triton cache (optional, saves the GPU's compile minutes): `bash bench/prebuild_triton_cache.sh` (no GPU;
# Python 3.12 + triton 3.6.0 as on the GPU image) writes bench/.gpu-carry/triton-cache.tar.xz; name bench/.gpu-carry
# in the device call's carry. Each phase logs how many kernels it found there and how many it compiled itself; smoke
# (and any phase that finds no cache) first precompiles the family on all cores (see precompile below).
#
# Run caches (bench/gpu_cache.sh): each phase also returns $OUT/cache-<phase>.tar.xz, what Triton and Inductor
# compiled in it (Inductor's FX graph and AOTAutograd caches and every new cubin). `bash bench/gpu_cache.sh add
# <files_at>/cache-*.tar.xz` here puts it into bench/.gpu-carry, and every later call that carries that folder
# unpacks it first: a compiled provider's case run again (a phase cut off, a later session) loads instead of compiling.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
phase=${1:-smoke}
shift || true
dry=${CVF_BENCH_DRY:-${GPU_RUN_DRY:-0}}
budget=${CVF_BENCH_PHASE_BUDGET:-${PHASE_BUDGET:-480}}
start=$SECONDS
OUT=${OUT:-}
if [ -n "$OUT" ]; then res="$OUT/results"; logdir="$OUT"; else res="bench/results"; logdir=$(mktemp -d); fi
mkdir -p "$res" "$logdir"
log="$logdir/$phase.log"
status=0
headline=crossvit_18_dagger_240

say() { echo "== $*" | tee -a "$log"; }

prebuilt=bench/.gpu-carry/triton-cache.tar.xz
tcache=/tmp/crossvit_fast-triton-cache
kernels_in() { find "$1" -name '__grp__*' 2>/dev/null | wc -l; }
if [ "$dry" != 1 ]; then
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$tcache}  # the prebuilt cache's path (Triton's index is absolute)
  mkdir -p "$TRITON_CACHE_DIR"
  if [ -f "$prebuilt" ]; then
    if [ "$TRITON_CACHE_DIR" = "$tcache" ]; then tar xJf "$prebuilt" -C "$tcache"
    else say "prebuilt cache not used: TRITON_CACHE_DIR is $TRITON_CACHE_DIR, not $tcache"; fi
  fi
  # Inductor's caches at a fixed path too, so that what a phase compiles can come back and be carried (gpu_cache.sh)
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/crossvit_fast-inductor-cache}
  bash bench/gpu_cache.sh unpack 2>&1 | tee -a "$log"
  cache_marker=$(mktemp) && touch "$cache_marker"
  tcache_before=$(kernels_in "$TRITON_CACHE_DIR")
  say "triton cache $TRITON_CACHE_DIR: $tcache_before kernels at the start"
fi

# step NAME CMD...: run CMD with the time left (minus a margin for packing); SIGINT first so pytest reports.
step() {
  local name=$1; shift
  local left=$((budget - (SECONDS - start) - 25))
  if [ "$dry" = 1 ]; then
    say "$name (dry)"
    "$@" 2>&1 | tee -a "$log" | tail -n 3
    local rc=${PIPESTATUS[0]}
    case "$rc" in
      0) ;;
      5) say "$name: no tests collected here (a module skipped at import, e.g. without timm)" ;;
      *) say "$name FAILED rc=$rc"; status=1 ;;
    esac
    return
  fi
  if [ "$left" -lt 30 ]; then say "$name skipped: out of time (${left}s left)"; status=1; return; fi
  say "$name (${left}s left)"
  timeout --signal=INT --kill-after=20 "$left" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  say "$name rc=$rc after $((SECONDS - start))s"
  [ "$rc" = 0 ] || status=1
}

# tests NAME PYTEST-ARGS...: pytest with a junit report; autotuning off (the tests pin their configs).
tests() {
  local name=$1; shift
  if [ "$dry" = 1 ]; then
    step "$name" python -m pytest -p no:cacheprovider --collect-only -q "$@"
  else
    CROSSVIT_FAST_AUTOTUNE=0 step "$name" python -m pytest -p no:cacheprovider -q -rfE \
      --junitxml="$logdir/junit-$name.xml" "$@"
  fi
}

# bench SCRIPT ARGS...: a benchmark writing its record into $res as it goes.
bench() {
  local script=$1; shift
  if [ "$dry" = 1 ]; then  # the real run's arguments too, so that a flag a script lacks fails here, not on the GPU
    step "$(basename "$script" .py)" python "$script" --dry-run --out-dir "$res" --no-plot "$@"
  else
    step "$(basename "$script" .py)" python "$script" --out-dir "$res" --no-plot "$@"
  fi
}

# parallel NAME:ARGS ...: several pytest processes at once (compiles are CPU-bound, one thread each), a log each.
parallel() {
  local pids=() spec
  for spec in "$@"; do
    ( log="$logdir/${spec%%:*}.log"; status=0; tests "${spec%%:*}" ${spec#*:}; exit "$status" ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
}

# precompile: the family's kernels (every tile the autotuners may time, tests/sm90_compile.py --set family) into the
# Triton cache on all cores at once, before anything launches. With a carried cache that hits: lookups only (seconds);
# without one, or if it misses (another triton build): the compiles the tests and benches would otherwise make one at
# a time, in-process, each autotuned key compiling its 8 GEMM tiles serially. Always in smoke (its log line says
# whether the carried cache hit); in the other phases when the cache holds fewer than 100 kernels, or
# CVF_BENCH_PRECOMPILE=1. CVF_BENCH_PRECOMPILE_S (default 240) caps its seconds.
precompile() {  # a speed-up only: its exit status (e.g. 124 when cut at CVF_BENCH_PRECOMPILE_S) does not fail the phase
  local before st=$status
  before=$(kernels_in "$TRITON_CACHE_DIR")
  step precompile timeout --signal=INT --kill-after=15 "${CVF_BENCH_PRECOMPILE_S:-${PRECOMPILE_S:-240}}" \
    python tests/sm90_compile.py --set family --jobs "$(nproc)" --cache-dir "$TRITON_CACHE_DIR"
  status=$st
  say "precompile: $(( $(kernels_in "$TRITON_CACHE_DIR") - before )) kernels compiled, $before were in the cache"
}
if [ "$dry" != 1 ] && { [ "$phase" = smoke ] || [ "${CVF_BENCH_PRECOMPILE:-${PRECOMPILE:-0}}" = 1 ] \
                         || [ "$tcache_before" -lt 100 ]; }; then
  precompile
fi

case "$phase" in
  smoke)
    [ "$dry" = 1 ] || { nvidia-smi 2>&1 | tee -a "$log"; python -m crossvit_fast info 2>&1 | tee -a "$log"; }
    # one process per file: their Triton compiles (CPU-bound, serial within a process) run side by side
    parallel "smoke-cls:-m smoke tests/test_cls_cross_attention.py" "smoke-sa:-m smoke tests/test_self_attention.py" \
      "smoke-ln:-m smoke tests/test_layer_norm.py" "smoke-linear:-m smoke tests/test_linear.py tests/test_block.py" \
      "smoke-models:-m smoke tests/test_model_backends.py tests/test_timm_parity.py"
    [ "$dry" = 1 ] || step check python -m crossvit_fast check "$headline"
    # the headline model first, then the ops' eager providers; Inductor's compiles (tens of seconds each) last
    bench bench/bench_model.py "$headline" --batch 256 --dtype bfloat16 --providers timm crossvit_fast reference
    bench bench/bench_cls_cross_attention.py --models "$headline" --batch 256 --dtype bfloat16 \
      --providers crossvit_fast reference
    bench bench/bench_self_attention.py --batch 256 --dtype bfloat16 --cases 401:7:32 197:7:64 \
      --providers crossvit_fast sdpa-flash sdpa-efficient sdpa-cudnn reference
    bench bench/bench_layer_norm.py --batch 256 --dtype bfloat16 --nc 401:224 197:448 --residual 1 \
      --providers crossvit_fast reference
    bench bench/bench_linear.py --models "$headline" --batch 256 --what block --passes forward \
      --providers crossvit_fast reference
    bench bench/bench_model.py "$headline" --batch 256 --dtype bfloat16 --passes forward --providers timm-compiled ;;
  tests-ops)
    parallel "tests-cls:tests/test_cls_cross_attention.py" "tests-sa:tests/test_self_attention.py" \
      "tests-ln:tests/test_layer_norm.py" "tests-linear:tests/test_linear.py tests/test_block.py"
    # which ops passed every CUDA test here, and the GPU_VERIFIED_OPS entry for this architecture (not a failure)
    [ "$dry" = 1 ] || python bench/verified_ops.py "$logdir"/junit-tests-{cls,sa,ln,linear}.xml 2>&1 | tee -a "$log"
    # the user's verification on this GPU: the record (verify.json) a shipped GPU_VERIFIED_OPS entry is made from
    [ "$dry" = 1 ] || step verify python -m crossvit_fast verify "$headline" --json "$logdir/verify.json" --budget-s 150 ;;
  tests-models)
    parallel "tests-model-backends:tests/test_model_backends.py" "tests-timm:tests/test_timm_parity.py" \
      "tests-rest:tests/test_convert.py tests/test_models.py tests/test_cli.py tests/test_training.py tests/test_backend.py" ;;
  bench-cls)
    bench bench/bench_cls_cross_attention.py --batch 256 --dtype bfloat16
    bench bench/bench_cls_cross_attention.py --batch 256 --dtype float32 float16 --providers crossvit_fast reference ;;
  bench-sa)
    bench bench/bench_self_attention.py --batch 256 --dtype bfloat16 --cases \
      401:3:32 401:6:32 401:12:32 401:4:32 401:7:32 197:3:64 197:6:64 197:12:64 197:4:64 197:7:64 \
      1157:6:32 1157:7:32 577:6:64 577:7:64 ;;
  bench-ln)
    bench bench/bench_layer_norm.py --batch 256 --dtype bfloat16
    bench bench/bench_layer_norm.py --batch 256 --dtype float32 --residual 1 ;;
  bench-linear)
    bench bench/bench_linear.py --models "${1:-$headline}" --batch 256 --what gemm block ;;
  bench-model)
    model=${1:-$headline}; dtype=${2:-bfloat16}; shift $(($# < 2 ? $# : 2))
    passes=(); [ $# -gt 0 ] && passes=(--passes "$@")
    bench bench/bench_model.py "$model" --batch 256 --dtype "$dtype" "${passes[@]}" ;;
  bench-models)
    bench bench/bench_model.py crossvit_9_240 crossvit_18_dagger_408 --batch 256 --dtype bfloat16 float32 \
      --providers timm crossvit_fast reference
    bench bench/bench_model.py "$headline" --batch 256 --dtype float32 --providers timm crossvit_fast reference ;;
  profile)
    bench bench/bench_model.py "$headline" --batch 256 --dtype bfloat16 --profile-only \
      --providers timm timm-compiled crossvit_fast ;;
  graphs)
    tests graphs tests/test_cuda_graphs.py
    bench bench/bench_model.py "$headline" --dtype bfloat16 --batch 1 8 --passes forward --graphs none runner \
      --providers crossvit_fast timm timm-compiled ;;
  *) echo "unknown phase $phase (see the header of $0)"; exit 2 ;;
esac

[ "$dry" = 1 ] || say "triton cache: $(( $(kernels_in "$TRITON_CACHE_DIR") - tcache_before )) kernels compiled in this phase"
say "phase $phase done in $((SECONDS - start))s, status $status"
if [ -n "$OUT" ] && [ "$dry" != 1 ]; then
  tgz=$(mktemp "${TMPDIR:-/tmp}/gpu_run.XXXXXX") && tar czf "$tgz" -C "$OUT" . \
    && find "$OUT" -mindepth 1 -delete && mv "$tgz" "$OUT/$phase.tgz" || echo "packing failed: the loose files stay in \$OUT"
  # what Triton and Inductor compiled in this phase, beside the tar: `bash bench/gpu_cache.sh add` it here
  bash bench/gpu_cache.sh pack "$OUT/cache-$phase.tar.xz" "$cache_marker" || echo "cache packing failed"
fi
exit "$status"
