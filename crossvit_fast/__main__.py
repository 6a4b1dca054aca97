import sys

from crossvit_fast.cli import main

sys.exit(main())
