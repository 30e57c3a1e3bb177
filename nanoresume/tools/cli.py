"""``nanoresume train`` (also ``python scripts/train.py``): parse flags, train, turn every outcome into an exit code.

With ``--self-test``, proves instead that the configuration resumes bit-exactly
(:mod:`nanoresume.tools.selftest`): exit 0 bit-exact, 1 not.

Exit codes: 0 finished; 1 a save failed or the loss became NaN/inf; 2 a bad
flag, path, data or checkpoint; 75 stopped by --time-limit; 128+N stopped by
signal N (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1, 129 SIGHUP).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

from .. import PROCESS_STARTED
from .clitools import command_line_stop_flag, exit_now, run_reporting_errors
from ..config import TrainConfig, read_command_line
from ..console import log
from ..invocation import command_words


def main(argv: Optional[list[str]] = None, prog: str = "train.py") -> int:
    argv = sys.argv[1:] if argv is None else argv

    def train() -> int:
        line = read_command_line(argv, prog)  # the one parse of argv
        if line.self_test is not None:
            from .selftest import self_test_training

            return self_test_training(without_mirror(line.cfg), line.explicit, processes=line.self_test)
        from .. import distributed  # after parsing: --help stays fast
        from ..trainer import Trainer

        try:
            # The stop message's "Continue with: ..." repeats the command that started this process;
            # a second signal ends the process at once (library use never does).
            return Trainer(line.cfg, stop=command_line_stop_flag(), explicit=line.explicit,
                           command=command_words(argv), started=PROCESS_STARTED).run().exit_code
        except Exception as e:  # DDP's and FSDP's own collectives (in backward) fail here, unguarded
            lost = distributed.lost_peer_error(e)
            if lost is None:
                raise
            distributed.report(lost)  # on every surviving rank: rank 0 may be the one that died
            return lost.exit_code

    # Ctrl-C before the loop takes over the signal reports "interrupted" (130): nothing to save yet.
    return run_reporting_errors(train, quiet=os.environ.get("RANK", "0") != "0")  # rank 0 speaks for all


def without_mirror(cfg: TrainConfig) -> TrainConfig:
    """The self-test's runs train in a temporary folder and never touch a --mirror (said once)."""
    if cfg.mirror is None:
        return cfg
    log.warning("--self-test ignores --mirror: its runs train in a temporary folder and upload nothing")
    return dataclasses.replace(cfg, mirror=None, mirror_option=None)


if __name__ == "__main__":
    exit_now(main(prog="python -m nanoresume.tools.cli"))
