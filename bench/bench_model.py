"""End-to-end model benchmark (also ``crossvit-fast bench``): see crossvit_fast/bench_model.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossvit_fast.bench_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
