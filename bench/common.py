"""The benchmarks' plumbing lives in the package (``crossvit_fast.bench_utils``) so that ``crossvit-fast bench``
works from an installed copy too; this module keeps the scripts' imports short."""

from crossvit_fast.bench_utils import (  # noqa: F401
    DTYPES,
    RESULTS_DIR,
    EagerFallbackError,
    assert_compiled,
    compile_fresh,
    do_bench_samples,
    gemm_tiles,
    measure_ceilings,
    median,
    new_record,
    record_path,
    pyplot,
    require_cuda,
    time_provider,
    timed_row,
    write_record,
)
