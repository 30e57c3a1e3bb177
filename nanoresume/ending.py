"""How a run ends, and what it reports: :class:`RunResult`, the wait for the last commit, and the last
line (finished, or stopped and how to continue where the run was started).

The trainer calls these once, after its loop; they decide nothing about *whether* to stop (that is
:mod:`nanoresume.stopping`), only how the end is told.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import launcher, messages
from .checkpoint import CheckpointManager
from .signals import StopFlag
from .stopping import Outcome
from .training_state import Counters


@dataclass
class RunResult:
    """What a call to :meth:`Trainer.run` (or :func:`nanoresume.train`) did."""

    step: int  # the step training reached (a resumed run counts from the start of the run, not of this call)
    stop_reason: Optional[str]  # None when training reached max_steps; "SIGINT", "time limit", ...
    exit_code: int  # what the command line would exit with: 0 finished, 128+signal, 75 time limit
    last_checkpoint: Optional[Path] = None  # the newest committed step checkpoint (None: none yet)
    best_val_loss: Optional[float] = None  # the best validation loss so far (None: no evaluation yet)
    best_checkpoint: Optional[Path] = None  # best.pt, the weights of that evaluation (None: not written yet)
    steps_trained: int = 0  # optimizer steps taken by this call

    @property
    def finished(self) -> bool:
        """Whether training reached ``max_steps`` (else it stopped early, and a resume continues it)."""
        return self.stop_reason is None


@dataclass(frozen=True)
class Origin:
    """Where the run was started, for the line after a stop that says how to continue it."""

    continue_in: str  # "shell" (the command), "notebook" (run the cell again), "python"
    command: Sequence[str]  # what the user runs to train
    out_dir: str
    launched: bool  # under torchrun: the launcher's command continues it, not the worker's own
    launcher: Optional[Sequence[str]]  # torchrun's command line, read at start (the launcher may be gone by now)


def fill(result: RunResult, counters: Counters, first_step: int, last_checkpoint: Optional[Path],
         best: Path) -> None:
    """What the run reached: its step, checkpoints and best validation loss."""
    result.step, result.steps_trained = counters.step, counters.step - first_step
    result.last_checkpoint = last_checkpoint
    result.best_val_loss = counters.best_val_loss if math.isfinite(counters.best_val_loss) else None
    result.best_checkpoint = best if best.exists() else None


def continue_hint(continue_in: str, stop: StopFlag) -> str:
    """After "interrupted; last committed checkpoint: step N": how to continue, where the run was started."""
    return messages.how_to_continue(continue_in, stop.last_committed_step)


def wait_for_commit(stop: StopFlag, manager: CheckpointManager, log: Callable[[str], None]) -> None:
    """Wait for the save in flight. In library use, a user who insists meanwhile is told what is being
    waited for, and that another interrupt abandons it (the command line exits at once instead)."""
    told = stop.forced_exit is not None
    while not told and manager.in_flight:
        if stop.forced:
            log(messages.waiting_for_commit(manager.staged_step, stop.last_committed_step))
            told = True
        else:
            time.sleep(0.02)
    manager.wait()


def last_line(outcome: Outcome, counters: Counters, last_checkpoint: Optional[Path], stop: StopFlag,
              origin: Origin, best: Path, elapsed_seconds: float) -> str:
    """How the run ended: finished, or stopped (why, what is saved, how to continue)."""
    step = counters.step
    if outcome.kind != "stop":
        return messages.finished(step, counters.tokens_seen, counters.best_val_loss, best, elapsed_seconds)
    if origin.continue_in != "shell":
        return messages.stopped_in_python(outcome.reason, step, last_checkpoint, stop.last_committed_step,
                                          origin.continue_in)
    if origin.launched:  # the launcher's command: the worker's own would continue on one process
        return messages.stopped_under_torchrun(
            outcome.reason, step, last_checkpoint,
            launcher.resume_auto(origin.launcher) if origin.launcher is not None else None)
    return messages.stopped(outcome.reason, step, last_checkpoint, origin.command, origin.out_dir)
