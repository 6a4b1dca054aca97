"""The benchmark scripts' CPU-side logic: case lists, the record format, the markdown table. Timing is CUDA-only."""

import json
import os
import subprocess
import sys

import pytest
import torch

from crossvit_fast import bench_model
from crossvit_fast.bench_utils import new_record, timed_row, write_record
from crossvit_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["bench_cls_cross_attention.py", "bench_self_attention.py", "bench_layer_norm.py",
                                    "bench_model.py", "bench_linear.py"])
def test_dry_run_lists_cases(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert " cases x " in r.stdout.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_no_gpu_no_timings(capsys):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["bench", "crossvit_9_240"])


def test_record_format_and_markdown(tmp_path):
    rec = new_record("model", {"copy_gb_per_s": 3000.0, "bf16_matmul_tflops": 700.0})
    for prov, ms in (("timm", 20.0), ("crossvit_fast", 10.0)):
        settings = {"model": "crossvit_9_240", "batch": 64, "dtype": "bfloat16", "pass": "forward", "img_size": 240}
        rec["rows"].append(timed_row(settings, prov, [ms, ms * 1.1, ms * 0.9], images_per_s=64 / (ms * 1e-3),
                                     peak_mem_mb=100.0, mfu=0.1))
    path = write_record(rec, str(tmp_path))
    with open(path) as f:
        data = json.load(f)
    assert {"benchmark", "device", "torch", "triton", "commit", "created", "ceilings", "rows"} <= set(data)
    row = data["rows"][1]
    assert row["provider"] == "crossvit_fast" and row["median_ms"] == 10.0 and len(row["samples_ms"]) == 3
    table = bench_model.markdown(data)
    assert "| crossvit_9_240 | forward | bfloat16 | 64 | crossvit_fast | 6400 | 2.00x |" in table
