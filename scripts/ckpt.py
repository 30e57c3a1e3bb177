#!/usr/bin/env python3
"""List, verify, show, diff and export checkpoints. `python scripts/ckpt.py --help` lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanoresume.tools.ckpt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
