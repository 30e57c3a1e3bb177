#!/usr/bin/env python3
"""Loss and perplexity of a checkpoint on a text file. `python scripts/evaluate.py --help` lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanoresume.tools.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
