"""``nanoresume train`` (also ``python scripts/train.py``): parse flags, train, turn every outcome into an exit code.

Exit codes: 0 finished; 1 a save failed or the loss became NaN/inf; 2 a bad
flag, path, data or checkpoint; 75 stopped by --time-limit; 128+N stopped by
signal N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1).
"""

from __future__ import annotations

import sys
from typing import Optional

from .clitools import run_reporting_errors
from .config import parse_command_line
from .invocation import command_words


def main(argv: Optional[list[str]] = None, prog: str = "train.py") -> int:
    argv = sys.argv[1:] if argv is None else argv

    def train() -> int:
        cfg, explicit = parse_command_line(argv, prog)
        from .trainer import Trainer  # after parsing: --help stays fast

        # The stop message's "Continue with: ..." repeats the command that started this process.
        return Trainer(cfg, explicit=explicit, command=command_words(argv)).run().exit_code

    # Ctrl-C before the loop takes over the signal reports "interrupted" (130): nothing to save yet.
    return run_reporting_errors(train)


if __name__ == "__main__":
    sys.exit(main(prog="python -m nanoresume.cli"))
