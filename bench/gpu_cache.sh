#!/usr/bin/env bash
# The compile caches that travel between GPU calls. Every device call starts a bare machine, so whatever Triton and
# Inductor compiled in one call is lost unless it comes back in $OUT and is carried into the next. Inductor's
# compiles are the bulk of a model phase (1-2 min per compiled provider and pass for crossvit_18); with its FX graph
# and AOTAutograd caches and the kernels' cubins carried, a repeated case loads them instead (the timm-compiled
# graphs, which no change here touches, hit in every later session).
#
#   on the GPU (bench/gpu_run.sh calls these):
#     bash bench/gpu_cache.sh unpack                 every bench/.gpu-carry/run-*.tar.xz into /tmp, oldest first
#     bash bench/gpu_cache.sh pack OUT.tar.xz MARKER the cache files written after MARKER (a file touched once the
#                                                    caches were unpacked), xz-compressed; none written: no file;
#                                                    over 15 MiB: parts OUT.tar.xz.part-a, -b, -c (45 MiB at most)
#   here, after a call:
#     bash bench/gpu_cache.sh add FILE...            copy returned archives (parts joined) into bench/.gpu-carry as
#                                                    run-NNN-NAME and say how much the carry weighs
#
# Both caches sit at fixed paths under /tmp (gpu_run.sh exports them): Triton's group index and Inductor's cached
# modules name their files by absolute path, so an archive only hits where it is unpacked to the same place. Entries
# are content-addressed (a key hashes the source, the compiler versions and the device), so a stale archive never
# loads a wrong kernel: it misses and costs only its unpacking. One exception, handled here: AOTAutograd's cache key
# covers the traced graph, in which a custom op is a name, but not the op's registered backward formula or fake
# function, so after a change to crossvit_fast's code it would replay the joint graph traced from the old formula.
# Each archive therefore holds a hash of the package's Python source (crossvit_fast-cache-source.txt), and unpack
# leaves out the aotautograd/ entries of an archive whose hash differs (the FX graphs and kernels still load;
# AOTAutograd only re-traces, in seconds). The device tool carries at most 64 MiB and returns at most 8 files of 16
# MiB: pack splits an archive over 15 MiB into parts and drops one over 45 MiB (the phase still returns its results);
# add warns above CVF_BENCH_CARRY_WARN_MIB (default 48; the older name CARRY_WARN_MIB is read where it is unset) and
# lists the archives to choose from (the oldest are the likeliest to miss). CVF_BENCH_CARRY_DIR (default
# bench/.gpu-carry), CVF_BENCH_CACHE_BASE (default /tmp) and CVF_BENCH_CACHE_PART_BYTES (default 15 MiB) move the
# carry, the caches' parent folder and the part size (tests/test_bench.py sets them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
carry=${CVF_BENCH_CARRY_DIR:-$root/bench/.gpu-carry}
base=${CVF_BENCH_CACHE_BASE:-/tmp}
# the paths gpu_run.sh gives TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR
dirs=(crossvit_fast-triton-cache crossvit_fast-inductor-cache)
max_bytes=${CVF_BENCH_CACHE_PART_BYTES:-$((15 * 1024 * 1024))}  # a returned file: 16 MiB at most
stamp=crossvit_fast-cache-source.txt  # inside each archive: the source hash it was made under
source_hash() {
  (cd "$root" && cat $(ls crossvit_fast/*.py crossvit_fast/ops/*.py kernels/*.py | LC_ALL=C sort)) \
    | sha256sum | cut -c1-16
}

cmd=${1:-}
shift || true
case "$cmd" in
  unpack)
    shopt -s nullglob
    n=0 here=$(source_hash)
    mkdir -p "$base"
    for f in "$carry"/run-*.tar.xz; do
      made=$(tar xJf "$f" -O "$stamp" 2>/dev/null || echo none)
      skip=(--exclude="$stamp")
      if [ "$made" != "$here" ]; then
        skip+=(--exclude="crossvit_fast-inductor-cache/aotautograd")
        echo "gpu_cache: $(basename "$f") was made under source $made, this is $here:" \
          "its aotautograd entries are left out"
      fi
      tar xJf "$f" -C "$base" "${skip[@]}" && n=$((n + 1)) || echo "gpu_cache: $f did not unpack (skipped)"
    done
    echo "gpu_cache: $n run archive(s) unpacked into $base" ;;
  pack)
    [ $# -eq 2 ] || { echo "usage: $0 pack OUT.tar.xz MARKER" >&2; exit 2; }
    out=$1 marker=$2
    [ -e "$marker" ] || { echo "gpu_cache: marker $marker missing" >&2; exit 2; }
    list=$(mktemp)
    # Triton's: what a hit loads (cubin, metadata and group index, the C launchers it builds per signature, the
    # autotune picks in *.autotune.json), not the IR and PTX; Inductor's: everything
    (cd "$base" && { [ -d "${dirs[0]}" ] && find "${dirs[0]}" -type f -newer "$marker" \
                       \( -name '*.cubin' -o -name '*.json' -o -name '*.so' \)
                     [ -d "${dirs[1]}" ] && find "${dirs[1]}" -type f -newer "$marker"; }) > "$list" || true
    count=$(wc -l < "$list")
    if [ "$count" -eq 0 ]; then echo "gpu_cache: nothing new to pack"; rm -f "$list"; exit 0; fi
    sdir=$(mktemp -d)
    source_hash > "$sdir/$stamp"
    XZ_OPT=${XZ_OPT:--T0 -6} tar cJf "$out" -C "$sdir" "$stamp" -C "$base" --files-from="$list"
    rm -rf "$list" "$sdir"
    bytes=$(stat -c %s "$out")
    if [ "$bytes" -gt $((3 * max_bytes)) ]; then
      rm -f "$out"
      echo "gpu_cache: $count new files make $((bytes / 1048576)) MiB, over the 45 MiB this returns: not packed"
    elif [ "$bytes" -gt "$max_bytes" ]; then  # a returned file weighs at most 16 MiB: parts, joined again by add
      split -b "$max_bytes" -a 1 "$out" "$out.part-" && rm -f "$out"
      echo "gpu_cache: $count new files packed into $(ls "$out".part-* | wc -l) parts," \
        "$out.part-* ($((bytes / 1024)) KiB)"
    else
      echo "gpu_cache: $count new files packed into $out ($((bytes / 1024)) KiB)"
    fi ;;
  add)
    [ $# -ge 1 ] || { echo "usage: $0 add FILE..." >&2; exit 2; }
    mkdir -p "$carry"
    shopt -s nullglob
    joined=$(mktemp -d)
    files=()
    for f in "$@"; do  # the parts of a split archive (NAME.part-a, -b, ...) are joined into NAME
      case "$f" in
        *.part-a) whole="$joined/$(basename "${f%.part-a}")"; cat "${f%-a}"-? > "$whole"; files+=("$whole") ;;
        *.part-?) ;;
        *) files+=("$f") ;;
      esac
    done
    for f in "${files[@]}"; do
      tar tJf "$f" > /dev/null || { echo "gpu_cache: $f is not an xz tar" >&2; exit 1; }
      last=0
      for g in "$carry"/run-*.tar.xz; do
        k=$(basename "$g"); k=${k#run-}; k=${k%%-*}; k=$((10#$k)); [ "$k" -gt "$last" ] && last=$k
      done
      dest=$(printf '%s/run-%03d-%s' "$carry" $((last + 1)) "$(basename "$f")")
      cp "$f" "$dest"
      echo "gpu_cache: added $dest"
    done
    rm -rf "$joined"
    total=$(du -cb "$carry" | tail -1 | cut -f1)
    echo "gpu_cache: the carry weighs $((total / 1048576)) MiB"
    warn_mib=${CVF_BENCH_CARRY_WARN_MIB:-${CARRY_WARN_MIB:-48}}
    if [ "$total" -gt $((warn_mib * 1048576)) ]; then
      echo "gpu_cache: over $warn_mib MiB (the device tool carries 64 MiB with the tree):" \
        "delete the oldest of"
      ls -1 "$carry"/run-*.tar.xz
    fi ;;
  *) echo "usage: $0 unpack | pack OUT.tar.xz MARKER | add FILE..." >&2; exit 2 ;;
esac
