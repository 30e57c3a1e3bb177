"""The process the chaos harness watches: ``python -m nanoresume.tools.chaos_child child TRAIN_ARGS...``
trains as ``nanoresume train`` would, and ``... script PATH ARGS...`` runs any script, each with its
checkpoint writes (and evaluations) announced on stderr so that a kill can be aimed inside one.

Apart from :mod:`.chaos` so that the harness itself never imports the train command.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from ..trainer import Trainer
from .chaos import EVAL_MARK, observe_checkpoint_writes
from .cli import main as train_main
from .clitools import exit_now


def _child_main(argv: list[str]) -> int:
    """scripts/train.py with observable (and slowed) checkpoint writes and evaluations (tests only)."""
    evaluate = Trainer.evaluate

    def announced_evaluate(self: Trainer) -> object:
        print(EVAL_MARK, file=sys.stderr, flush=True)
        return evaluate(self)

    Trainer.evaluate = announced_evaluate  # type: ignore[method-assign]
    observe_checkpoint_writes()
    return train_main(argv)


def _script_main(path: str, argv: list[str]) -> None:
    """Run the Python script at ``path`` as ``__main__`` with ``argv``, its checkpoint writes announced."""
    observe_checkpoint_writes()
    sys.argv = [path, *argv]
    sys.path[0] = str(Path(path).resolve().parent)  # as `python path` would have it
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        exit_now(_child_main(sys.argv[2:]))  # like scripts/train.py: no slow interpreter teardown
    if len(sys.argv) > 2 and sys.argv[1] == "script":
        _script_main(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    sys.exit("usage: python -m nanoresume.tools.chaos_child child TRAIN_ARGS... | script PATH ARGS... "
             "(see scripts/chaos.py for the harness)")
