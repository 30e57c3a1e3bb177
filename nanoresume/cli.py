"""``python scripts/train.py``: parse flags, train, and turn every outcome into an exit code.

Exit codes: 0 finished; 1 a save failed or the loss became NaN/inf; 2 a bad
flag, path, data or checkpoint; 75 stopped by --time-limit; 128+N stopped by
signal N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1).
"""

from __future__ import annotations

import sys
from typing import Optional

from .config import explicit_fields, parse_config
from .errors import NanoresumeError


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        from .trainer import Trainer  # after parsing: --help stays fast

        trainer = Trainer(cfg, explicit=explicit_fields(argv))
        return trainer.run().exit_code
    except NanoresumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Ctrl-C before the training loop took over the signal: nothing to save yet.
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
