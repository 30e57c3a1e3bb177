#!/usr/bin/env python3
"""Train a small GPT. `python scripts/train.py --help` lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanoresume.tools.cli import main  # noqa: E402
from nanoresume.tools.clitools import exit_now  # noqa: E402

if __name__ == "__main__":
    exit_now(main())
