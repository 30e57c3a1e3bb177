"""``python scripts/train.py``: parse flags, train, and turn every outcome into an exit code.

Exit codes: 0 finished; 1 a save failed or the loss became NaN/inf; 2 a bad
flag, path, data or checkpoint; 75 stopped by --time-limit; 128+N stopped by
signal N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1).
"""

from __future__ import annotations

import sys
from typing import Optional

from .config import explicit_fields, parse_config
from .clitools import run_reporting_errors


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def train() -> int:
        cfg = parse_config(argv)
        from . import distributed  # after parsing: --help stays fast
        from .trainer import Trainer

        try:
            return Trainer(cfg, explicit=explicit_fields(argv)).run().exit_code
        except RuntimeError as e:
            lost = distributed.lost_peer_error(e)
            if lost is None:
                raise
            raise lost from e

    # Ctrl-C before the loop takes over the signal reports "interrupted" (130): nothing to save yet.
    return run_reporting_errors(train, quiet=not _is_main_process())


def _is_main_process() -> bool:
    """False on the ranks other than 0 under torchrun (read without importing torch)."""
    import os

    return os.environ.get("RANK", "0") == "0"
