"""Which fused ops passed their CUDA parity tests, from the junit reports of ``bash bench/gpu_run.sh tests-ops``.

    python bench/verified_ops.py junit-tests-cls.xml junit-tests-sa.xml junit-tests-ln.xml junit-tests-linear.xml

An op counts as verified when every test file of the op (``OP_TEST_FILES``) is in the reports, none of its tests
failed or errored, and some passed. Run on the GPU machine (gpu_run.sh does, after tests-ops) it names the device's
architecture (``crossvit_fast.backend.device_arch``); elsewhere give it with ``--arch``. It prints a per-op summary
and the ``GPU_VERIFIED_OPS`` entry to paste into ``crossvit_fast/backend.py`` (a person decides: the entry also wants
the op's benchmark record committed). Exit status 0 when every op verified, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from crossvit_fast.ops.registry import OPS  # noqa: E402

OP_TEST_FILES: Dict[str, List[str]] = {name: list(spec.tests) for name, spec in OPS.items()}
"""op -> the test modules whose CUDA run verifies it (the registry's)."""


def count(paths: List[str]) -> Dict[str, Dict[str, int]]:
    """Per test module (``test_linear``): passed, failed (failures and errors), skipped, and of those skipped the
    ones that wanted a CUDA GPU ("needs a CUDA GPU": the parity tests did not run). A report that is missing or
    cannot be parsed (a step cut off) is left out, with a note on stderr."""
    out: Dict[str, Dict[str, int]] = {}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:
            print(f"verified_ops: {path} left out: {e}", file=sys.stderr)
            continue
        for case in root.iter("testcase"):
            module = case.get("classname", "").split(".")
            module = next((m for m in module if m.startswith("test_")), "?")
            c = out.setdefault(module, {"passed": 0, "failed": 0, "skipped": 0, "no_cuda": 0})
            kinds = {child.tag: child for child in case}
            if "failure" in kinds or "error" in kinds:
                c["failed"] += 1
            elif "skipped" in kinds:
                c["skipped"] += 1
                c["no_cuda"] += "CUDA" in (kinds["skipped"].get("message") or "")
            else:
                c["passed"] += 1
    return out


def verified(counts: Dict[str, Dict[str, int]]) -> Dict[str, str]:
    """Per op: "" when verified, else why not."""
    out = {}
    for op, files in OP_TEST_FILES.items():
        why = []
        for f in files:
            c = counts.get(f)
            if c is None:
                why.append(f"no report of {f}.py")
            elif c["failed"]:
                why.append(f"{c['failed']} failed in {f}.py")
            elif c["no_cuda"]:
                why.append(f"{c['no_cuda']} CUDA tests skipped in {f}.py (no GPU seen)")
            elif not c["passed"]:
                why.append(f"nothing passed in {f}.py")
        out[op] = "; ".join(why)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="pytest --junitxml files")
    ap.add_argument("--arch", help="the GPU architecture the tests ran on (default: this machine's CUDA device)")
    args = ap.parse_args(argv)
    arch = args.arch
    if arch is None:
        from crossvit_fast.backend import device_arch

        arch = device_arch()
    if arch is None:
        ap.error("no CUDA device here: say with --arch which architecture the reports come from")
    counts = count(args.reports)
    ok = verified(counts)
    for op, why in ok.items():
        files = ", ".join(
            f"{f}.py {counts[f]['passed']} passed / {counts[f]['failed']} failed / {counts[f]['skipped']} skipped"
            for f in OP_TEST_FILES[op] if f in counts)
        print(f"{op:<20} {'verified on ' + arch if not why else 'NOT verified: ' + why}  ({files or 'no report'})")
    good = [op for op, why in ok.items() if not why]
    entry = ", ".join(f'"{op}": frozenset({{"{arch}"}})' for op in good)
    print(f"GPU_VERIFIED_OPS entry for {arch}: {{{entry}}}")
    return 0 if len(good) == len(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
