"""End-to-end model benchmark (also ``crossvit-fast bench``): see crossvit_fast/bench_model.py."""

import sys

from crossvit_fast.bench_model import main

if __name__ == "__main__":
    sys.exit(main())
