#!/usr/bin/env python3
"""Generate text from a trained checkpoint. `python scripts/sample.py --help` lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanoresume.tools.sampling import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
