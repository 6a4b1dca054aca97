"""The README's figures, made from the committed records in ``bench/results/`` and nothing else.

    python bench/report.py                 # print the summary (markdown) of the newest records
    python bench/report.py --readme        # also rewrite the README's block between the results markers
    python bench/report.py --plot          # also write bench/results/model.png (needs matplotlib)

For each benchmark and device the records of the newest commit measured there are merged (incomplete records, cut
off by a time limit, are used and marked as such). The model table compares providers at the same model, pass, dtype and batch (CUDA graphs off);
each op table shows the crossvit_fast provider's speedup over every other provider of the same case. Every table
names the device, torch, triton, commit and date of its record.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from crossvit_fast.ops.registry import OPS  # noqa: E402

RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MODEL_PROVIDERS = ("timm", "timm-compiled", "reference", "crossvit_fast", "crossvit_fast-compiled")


def load_records(folder: str = RESULTS) -> List[Dict[str, object]]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            rec = json.load(f)
        if isinstance(rec, dict) and {"benchmark", "device", "created", "rows"} <= set(rec):
            rec["_path"] = os.path.relpath(path, os.path.dirname(HERE))
            out.append(rec)
    return out


def newest(records: List[Dict[str, object]], benchmark: str) -> List[Dict[str, object]]:
    """For each device, the rows of ``benchmark`` from the newest commit measured there: the records of that commit
    merged in time order (a later row of the same case and provider replaces an earlier one)."""
    by_device: Dict[str, List[Dict[str, object]]] = {}
    for rec in records:
        if rec["benchmark"] == benchmark and rec["rows"]:
            by_device.setdefault(rec["device"], []).append(rec)
    out = []
    for device in sorted(by_device):
        recs = sorted(by_device[device], key=lambda r: r["created"])
        same = [r for r in recs if r["commit"] == recs[-1]["commit"]]
        merged: Dict[str, Dict[str, object]] = {}
        for r in same:
            for row in r["rows"]:
                key = json.dumps({k: v for k, v in row.items() if k not in _MEASURED}, sort_keys=True)
                merged[key] = row
        rec = dict(same[-1])
        rec["rows"] = list(merged.values())
        rec["skipped"] = [k for r in same for k in r.get("skipped", [])]
        rec["complete"] = all(r.get("complete", True) for r in same)
        rec["_path"] = ", ".join(r["_path"] for r in same)
        out.append(rec)
    return out


_MEASURED = ("median_ms", "samples_ms", "images_per_s", "gb_per_s", "tflops", "peak_mem_mb", "mfu", "frac_of_copy",
             "speedup", "speedup_vs_compiled", "bytes")


def provenance(rec: Dict[str, object]) -> str:
    c = rec.get("ceilings") or {}
    partial = "" if rec.get("complete", True) else "; **incomplete record** (cut off by a time limit)"
    return (f"{rec['device']}, torch {rec['torch']}, triton {rec['triton']}, commit {rec['commit']}, {rec['created']}; "
            f"measured copy {c.get('copy_gb_per_s', '?')} GB/s, bf16 matmul {c.get('bf16_matmul_tflops', '?')} "
            f"TFLOP/s (`{rec['_path']}`{partial})")


def model_table(rec: Dict[str, object]) -> str:
    rows = [r for r in rec["rows"] if r.get("graphs", "none") == "none"]
    provs = [p for p in MODEL_PROVIDERS if any(r["provider"] == p for r in rows)]
    keys = sorted({(r["model"], r["pass"], r["dtype"], r["batch"]) for r in rows})
    lines = [f"images/s; bfloat16 = bf16 autocast over float32 weights; train_step = forward + backward + AdamW. "
             f"{provenance(rec)}", "",
             "| model | pass | dtype | batch | " + " | ".join(provs) + " | crossvit_fast vs timm |",
             "|---|---|---|---|" + "---|" * (len(provs) + 1)]
    for key in keys:
        val = {r["provider"]: r["images_per_s"] for r in rows if (r["model"], r["pass"], r["dtype"], r["batch"]) == key}
        speed = (f"{val['crossvit_fast'] / val['timm']:.2f}x" if "crossvit_fast" in val and "timm" in val else "-")
        cells = [f"{val[p]:.0f}" if p in val else "-" for p in provs]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + f" | {speed} |")
    measured = {(r["model"], r["pass"], r["dtype"], r["batch"], r["provider"]) for r in rows}
    oom = sorted({(k["model"], k["pass"], k["dtype"], k["batch"], k["provider"]) for k in rec.get("skipped", [])
                  if k.get("graphs", "none") == "none"} - measured)
    if oom:
        lines += ["", "Out of memory, so not in the table: "
                  + "; ".join(f"{m} {p} {d} batch {b} ({prov})" for m, p, d, b, prov in oom) + "."]
    return "\n".join(lines) + "\n"


_SHAPE_KEYS = ("kind", "model", "branch", "gemm", "direction", "batch", "dtype", "pass", "M", "K", "N", "T", "C", "heads",
               "head_dim", "residual", "graphs")
"""A case's identity in an op table: every setting a row may carry (``linear``'s qkv and fc1 GEMMs share N, as do
its proj and fc2: without ``gemm`` and ``K`` their times would overwrite each other)."""


def op_table(rec: Dict[str, object]) -> str:
    """crossvit_fast's median time and its speedup over each other provider, per case."""
    cases: Dict[tuple, Dict[str, float]] = {}
    for r in rec["rows"]:
        key = tuple((k, r[k]) for k in _SHAPE_KEYS if k in r)
        cases.setdefault(key, {})[r["provider"]] = r["median_ms"]
    others = sorted({p for v in cases.values() for p in v if p != "crossvit_fast"})
    fields = [k for k in _SHAPE_KEYS if any(k in dict(key) for key in cases)]
    lines = [f"`{rec['benchmark']}`: crossvit_fast's median ms and its speedup over each provider. {provenance(rec)}", "",
             "| " + " | ".join(fields) + " | crossvit_fast ms | " + " | ".join(f"vs {p}" for p in others) + " |",
             "|" + "---|" * (len(fields) + 1 + len(others))]
    for key, val in cases.items():
        if "crossvit_fast" not in val:
            continue
        d = dict(key)
        ours = val["crossvit_fast"]
        cells = [f"{val[p] / ours:.2f}x" if p in val else "-" for p in others]
        lines.append("| " + " | ".join(str(d.get(k, "")) for k in fields) + f" | {ours:.4f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def summary(records: List[Dict[str, object]], folder: str = RESULTS) -> str:
    """The results block: the tables of the newest records, and the plot when ``<folder>/model.png`` exists."""
    parts = []
    for rec in newest(records, "model"):
        parts += ["### Whole models", "", model_table(rec)]
    for op in OPS:
        for rec in newest(records, op):
            parts += [f"### `{op}`", "", op_table(rec)]
    if not parts:
        return "No GPU benchmark record has been committed yet: no speed is claimed.\n"
    png = os.path.join(folder, "model.png")
    if os.path.exists(png):
        parts.append(f"![images/s by provider]({os.path.relpath(png, os.path.dirname(README))})\n")
    return "\n".join(parts)


def plot(records: List[Dict[str, object]], path: str) -> Optional[str]:
    """The model benchmark's own plot (``crossvit_fast.bench_model.plot``) of the newest model record."""
    recs = newest(records, "model")
    if not recs:
        return None
    from crossvit_fast.bench_model import plot as model_plot

    return model_plot(recs[0], path)


def rewrite_readme(text: str, readme: str = README) -> None:
    with open(readme) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to rewrite")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + BEGIN + "\n" + text.rstrip("\n") + "\n" + END + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=RESULTS, help="the records' folder (default bench/results/)")
    p.add_argument("--readme", action="store_true", help="rewrite the README's results block")
    p.add_argument("--plot", action="store_true", help="write <results>/model.png")
    args = p.parse_args(argv)
    records = load_records(args.results)
    if args.plot:
        plot(records, os.path.join(args.results, "model.png"))
    text = summary(records, args.results)
    print(text)
    if args.readme:
        rewrite_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
